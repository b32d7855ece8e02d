"""Baseline PTQ methods, each registered by name in eda.registry: `rtn`, `qdiffusion`, `ptq4dm`.

Import nothing here: `eda.registry.get_method` imports the method modules listed in `BUILTIN_MODULES` on first use.
"""
