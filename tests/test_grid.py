"""Grid files expand into exactly the cells they describe; bad files and names fail with one line."""

import pytest

from bench.errors import UsageError
from bench.harness.grid import Cell, apply_overrides, available_grids, cell_bits, load_grid
from eda.registry import parse_overrides

GRID = """
name = "g"
imports = ["tests.harness_plugin"]
[defaults]
methods = ["fp", "test-ok", "test-raise"]
bits = ["W8A8", "W4A8"]
seeds = [0, 1]
samples = 16
[set]
iters_scale = 0.5
noise = 0.1
[method."test-raise"]
noise = 0.2
[[model]]
name = "test-tiny"
[[model]]
name = "other"
methods = ["test-ok"]
bits = ["W3A8"]
seeds = [7]
samples = 4
sampler = { kind = "ddim", steps = 10, eta = 0.0, skip = "uniform" }
"""


@pytest.fixture
def grid_file(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text(GRID)
    return p


def test_grid_expands_as_written(grid_file):
    g = load_grid(str(grid_file))
    cells = g.cells()
    tiny = [(c.method, c.bits, c.seed) for c in cells if c.model == "test-tiny"]
    # fp has no bit width: one cell per seed; the others: bits x seeds, in file order
    assert tiny == [("fp", "FP", 0), ("fp", "FP", 1),
                    ("test-ok", "W8A8", 0), ("test-ok", "W8A8", 1), ("test-ok", "W4A8", 0), ("test-ok", "W4A8", 1),
                    ("test-raise", "W8A8", 0), ("test-raise", "W8A8", 1),
                    ("test-raise", "W4A8", 0), ("test-raise", "W4A8", 1)]
    other = [c for c in cells if c.model == "other"]
    assert [(c.method, c.bits, c.seed, c.samples) for c in other] == [("test-ok", "W3A8", 7, 4)]
    assert other[0].sampler == {"kind": "ddim", "steps": 10, "eta": 0.0, "skip": "uniform"}
    assert all(c.samples == 16 and c.sampler is None for c in cells if c.model == "test-tiny")
    by = {(c.method, c.bits): c for c in cells if c.model == "test-tiny"}
    assert by[("test-ok", "W8A8")].overrides == {"iters_scale": 0.5, "noise": 0.1}
    assert by[("test-raise", "W8A8")].overrides == {"iters_scale": 0.5, "noise": 0.2}  # [method."..."] wins
    assert g.imports == ["tests.harness_plugin"]
    assert (by[("test-ok", "W4A8")].w_bits, by[("test-ok", "W4A8")].a_bits) == (4, 8)


def test_cell_keys_are_stable_and_distinct(grid_file):
    a, b = load_grid(str(grid_file)).cells(), load_grid(str(grid_file)).cells()
    assert [c.key for c in a] == [c.key for c in b]
    assert len({c.key for c in a}) == len(a)
    c = a[2]
    assert Cell.from_dict(c.to_dict()) == c and Cell.from_dict(c.to_dict()).key == c.key


def test_command_line_overrides(grid_file):
    g = apply_overrides(load_grid(str(grid_file)), samples=3, seeds=[5], methods=["test-ok"], bits=["W6A6"],
                        models=["test-tiny"], sets=parse_overrides(["noise=0.3", "loss=fbr"]))
    cells = g.cells()
    assert [(c.model, c.method, c.bits, c.seed, c.samples) for c in cells] == [("test-tiny", "test-ok", "W6A6", 5, 3)]
    assert cells[0].overrides == {"iters_scale": 0.5, "noise": 0.3, "loss": "fbr"}  # --set wins over the grid
    with pytest.raises(UsageError, match="not in grid"):
        apply_overrides(load_grid(str(grid_file)), models=["nope"])


@pytest.mark.parametrize("bad", ["W1A8", "W4", "8bit", "W4A17"])
def test_bad_bits(bad):
    with pytest.raises(UsageError, match="bad bit setting .* 2..16"):
        cell_bits(bad)


def test_cell_bits_read_the_one_parser():
    """A cell's bits go through eda.policy.parse_bits (the one parser); FP is the harness's own label."""
    from eda.policy import parse_bits

    assert cell_bits("FP") == (32, 32)
    assert cell_bits("W4A8") == parse_bits("W4A8") == (4, 8)
    with pytest.raises(UsageError, match="WxAy"):
        cell_bits("W4")


def test_bad_grid_files(tmp_path):
    with pytest.raises(UsageError, match="unknown grid"):
        load_grid("no-such-grid")
    p = tmp_path / "bad.toml"
    p.write_text('[defaults]\nmethods = ["fp"]\nbitz = ["W8A8"]\n[[model]]\nname = "m"\n')
    with pytest.raises(UsageError, match="unknown keys"):
        load_grid(str(p))
    p.write_text('[defaults]\nmethods = ["fp"]\n[[model]]\nname = "m"\n')
    with pytest.raises(UsageError, match="no 'bits'"):
        load_grid(str(p))
    p.write_text("not = = toml")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_grid(str(p))


def test_shipped_grids():
    assert {"smoke", "digits", "full"} <= set(available_grids())
    smoke = load_grid("smoke")
    assert smoke.model_names() == ["digits-ddpm"]
    assert smoke.method_names() == ["fp", "rtn", "ptq4dm", "qdiffusion", "eda-dm"]
    assert len(smoke.cells()) == 1 + 4 * 2
    full = load_grid("full")
    assert full.model_names() == ["cifar10-ddim", "lsun-bedroom-ldm4", "lsun-church-ldm8", "imagenet-ldm4", "sd-v1-4"]
    for c in full.cells():
        assert c.samples == (10_000 if c.model == "sd-v1-4" else 50_000)
    digits = load_grid("digits")  # two models x 3 seeds x (FP + 6 methods x 3 settings), each cell once
    cells = digits.cells()
    assert len(cells) == 2 * 3 * (1 + 6 * 3) and len({c.key for c in cells}) == len(cells)
    assert {c.model for c in cells} == {"digits-ddpm", "digits-cosine"}
    assert all(c.overrides["n_samples"] == 1024 and c.samples == 512 for c in cells)
    assert {c.overrides["budget"] for c in cells if c.method == "qdiffusion"} == {"fraction"}
    assert {c.overrides["budget"] for c in cells if c.method.startswith("eda-dm")} == {"converged"}


def _with_resources(tmp_path, block: str, extra: str = ""):
    p = tmp_path / "r.toml"
    p.write_text(GRID.replace('[[model]]\nname = "other"', f'{extra}[[model]]\nname = "other"\n{block}', 1))
    return p


def test_model_block_resources(tmp_path):
    from types import SimpleNamespace

    from bench.harness.plan import resource_groups, resources

    g = load_grid(str(_with_resources(tmp_path, 'resources = { gpus = 0.5, cpus = 4, memory = "2GiB" }',
                                      '[resources]\ngpus_per_worker = 1\ncpus_per_worker = 2\n')))
    assert g.model_resources == {"other": {"gpus": 0.5, "cpus": 4.0, "memory": 2 * 2**30}}
    assert [b.get("resources") for b in g.models] == [None, g.model_resources["other"]]
    args = SimpleNamespace(gpus_per_worker=None, cpus_per_worker=None, max_workers=None)
    cluster = {"CPU": 16.0, "GPU": 2.0, "memory": 5 * 2**30}
    # the block's resources win over the grid's [resources]; other models keep the grid's
    assert resources(g, args, cluster, "other") == {"workers": 2, "cpus_per_worker": 4.0, "gpus_per_worker": 0.5,
                                                   "memory_per_worker": 2 * 2**30}  # 4 half GPUs, 2 by memory
    assert resources(g, args, cluster, "test-tiny") == {"workers": 2, "cpus_per_worker": 2.0, "gpus_per_worker": 1.0,
                                                       "memory_per_worker": None}
    # --gpus/--cpus-per-worker win over both
    cli = SimpleNamespace(gpus_per_worker=1.0, cpus_per_worker=1.0, max_workers=None)
    assert resources(g, cli, cluster, "other")["gpus_per_worker"] == 1.0
    assert resources(g, cli, cluster, "other")["cpus_per_worker"] == 1.0
    # cells split into one group per model with its own resources, the rest together
    groups = resource_groups(g, g.cells())
    assert [(m, {c.model for c in cells}) for m, cells in groups] == [(None, {"test-tiny"}), ("other", {"other"})]
    assert sum(len(cells) for _, cells in groups) == len(g.cells())
    # memory as a bare number is GiB; units are case-insensitive
    g = load_grid(str(_with_resources(tmp_path, "resources = { memory = 1.5 }")))
    assert g.model_resources["other"] == {"memory": int(1.5 * 2**30)}
    g = load_grid(str(_with_resources(tmp_path, 'resources = { memory = "512mib" }')))
    assert g.model_resources["other"] == {"memory": 512 * 2**20}


@pytest.mark.parametrize("block, msg", [
    ("resources = { gpu = 1 }", r"model 'other' resources has unknown keys \['gpu'\]; expected some of"),
    ("resources = { gpus = 1.5 }", "above 1 GPU Ray takes whole GPUs only"),
    ("resources = { gpus = -1 }", r"gpus = -1; expected a number >= 0"),
    ("resources = { cpus = 0 }", r"cpus = 0; expected a number > 0"),
    ('resources = { cpus = "four" }', r"cpus = 'four'; expected a number > 0"),
    ('resources = { memory = "lots" }', "memory = 'lots'; expected a positive size"),
    ('resources = { memory = "4 XB" }', "expected a positive size"),
    ("resources = { memory = 0 }", "expected a positive size"),
    ("resources = 2", "resources must be a table"),
])
def test_bad_model_block_resources(tmp_path, block, msg):
    p = _with_resources(tmp_path, block)
    with pytest.raises(UsageError, match=msg) as e:
        load_grid(str(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_resources_are_per_model_not_defaults(tmp_path):
    p = tmp_path / "d.toml"
    p.write_text(GRID.replace("samples = 16\n", "samples = 16\nresources = { gpus = 1 }\n", 1))
    with pytest.raises(UsageError, match=r"\[defaults\] has unknown keys \['resources'\]"):
        load_grid(str(p))
    # one model in two blocks must ask for the same actors (an actor takes any cell of the model it holds)
    p.write_text(GRID + '[[model]]\nname = "other"\nmethods = ["fp"]\nresources = { cpus = 2 }\n')
    with pytest.raises(UsageError, match="model 'other' is in several .* different resources"):
        load_grid(str(p))


def test_fid_mode_and_reference_stats_in_a_grid(tmp_path):
    """Both are per-model settings that enter the cell key only when set (cells without them keep their keys), and
    a relative statistics path is read from the grid file's folder."""
    base = 'name = "g"\n[defaults]\nmethods = ["rtn"]\nbits = ["W8A8"]\nseeds = [0]\nsamples = 4\n[[model]]\nname = "m"\n'
    (tmp_path / "a.toml").write_text(base)
    (tmp_path / "b.toml").write_text(base + 'fid_mode = "legacy_tensorflow"\nreference_stats = "s/c10.npz"\n')
    (tmp_path / "c.toml").write_text(base + 'fid_mode = "tf"\n')
    a, b = load_grid(str(tmp_path / "a.toml")).cells()[0], load_grid(str(tmp_path / "b.toml")).cells()[0]
    assert a.fid_mode == "clean" and a.reference_stats is None
    assert b.fid_mode == "legacy_tensorflow" and b.reference_stats == str((tmp_path / "s" / "c10.npz").resolve())
    assert a.key != b.key and a.key == Cell("g", "m", "rtn", "W8A8", 0, 4).key
    with pytest.raises(UsageError, match="fid_mode 'tf'; expected one of clean, legacy_tensorflow, legacy_pytorch"):
        load_grid(str(tmp_path / "c.toml"))


def test_overrides_that_collapse_blocks_give_each_cell_once():
    # digits.toml lists each model in several blocks (main methods, ablations, W8A8); `--methods eda-dm --bits W4A8`
    # turns them all into the same block, whose cells must be planned (and run) once, in file order.
    g = apply_overrides(load_grid("digits"), methods=["eda-dm"], bits=["W4A8"], seeds=[0, 1])
    cells = g.cells()
    assert len({c.key for c in cells}) == len(cells) == 2 * 2  # 2 models x 2 seeds
    assert [(c.model, c.seed) for c in cells] == [("digits-ddpm", 0), ("digits-ddpm", 1),
                                                  ("digits-cosine", 0), ("digits-cosine", 1)]
