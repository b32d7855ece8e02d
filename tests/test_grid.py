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
    digits = load_grid("digits")
    assert len(digits.cells()) == 3 * (1 + 6 * 3)
