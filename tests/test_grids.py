"""gguf_kquant/codecs/grids.py is exactly what gen_grids.py makes of the oracle's own llama.cpp source.

The tables' values are then proven against the running library by the codec harness
(tests/test_codecs_oracle.py): every dequantizer that reads a grid or kvalues table is compared with ggml's
``to_float`` on random blocks, which index every table entry many times over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gguf_kquant.codecs import gen_grids, grids


def test_generated_module_is_up_to_date(oracle):
    tree = oracle.vendor_llama_cpp()
    committed = Path(grids.__file__).read_text()
    tables = gen_grids.extract(tree)
    body = gen_grids.render(tables, "ORIGIN")
    # the origin line names the sdist it came from; everything after the docstring must be identical
    assert committed.split('"""', 2)[2] == body.split('"""', 2)[2]


def test_table_shapes_and_types():
    expected = {"iq2xxs_grid": 256, "iq2xs_grid": 512, "iq2s_grid": 1024, "iq3xxs_grid": 256, "iq3s_grid": 512,
                "iq1s_grid": 2048, "ksigns_iq2xs": 128, "kmask_iq2xs": 8, "kvalues_iq4nl": 16,
                "kvalues_fp4": 16, "kgrid_2bit_256": 256, "kgrid_2bit_512": 512, "kgrid_1bit_2048": 2048,
                "kgrid_2bit_1024": 1024, "kgrid_256": 256, "kgrid_512": 512}
    for name, size in expected.items():
        table = getattr(grids, name)
        assert table.shape == (size,), name
        assert not table.flags.writeable, name
        assert np.dtype(gen_grids.COMMON_TABLES.get(name) or gen_grids.QUANTS_TABLES[name]) == table.dtype


def _consistent_increasing_map(keys: np.ndarray, values: np.ndarray) -> dict:
    mapping: dict[int, int] = {}
    for k, v in zip(keys.ravel().tolist(), values.ravel().tolist()):
        assert mapping.setdefault(k, v) == v, f"index value {k} maps to both {mapping[k]} and {v}"
    ordered = [mapping[k] for k in sorted(mapping)]
    assert ordered == sorted(set(ordered)), mapping
    return mapping


def test_grids_expand_from_their_index_tables():
    """ggml's quantizers search the grids built from the kgrid index tables (2 bits (IQ2) / 3 bits (IQ3) per
    element -> 2*l+1); its dequantizers read ggml-common.h's grids of magnitudes.  Both must be the same grid:
    one fixed increasing map from 2*l+1 to the magnitude, entry by entry."""
    def expand(kgrid, bits, n):
        vals = [(kgrid[:, None].astype(np.int64) >> (bits * i)) & ((1 << bits) - 1) for i in range(n)]
        return np.concatenate(vals, axis=1) * 2 + 1

    for kgrid, grid in ((grids.kgrid_2bit_256, grids.iq2xxs_grid), (grids.kgrid_2bit_512, grids.iq2xs_grid),
                        (grids.kgrid_2bit_1024, grids.iq2s_grid)):
        m = _consistent_increasing_map(expand(kgrid, 2, 8), grid.view(np.uint8).reshape(-1, 8))
        assert m == {1: 8, 3: 25, 5: 43}
    for kgrid, grid in ((grids.kgrid_256, grids.iq3xxs_grid), (grids.kgrid_512, grids.iq3s_grid)):
        m = _consistent_increasing_map(expand(kgrid, 3, 4), grid.view(np.uint8).reshape(-1, 4))
        assert sorted(m) == [2 * l + 1 for l in range(8)]
