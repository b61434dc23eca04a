"""The layer table: one row per quantizable layer (conv or linear) in execution order.

Every stage reads it and adds columns; none renames or drops one. `COLUMNS` lists each column with its dtype,
the stage that adds it and what it means; `check_table` validates a table for the solver (and any stage that
needs the sensitivity columns). Code names a column through this module, never by a literal: the columns that
exist once by `COL` (`table[COL.params]`), those that exist once per bit width b by `omega_col(b)`,
`delta_col(b)`, `lat_col(b)` and `glue_col(b)` (tests/test_architecture.py holds the rest of the code to it).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import pandas as pd

from hawq_ray.contract.errors import TableError

BIT_WIDTHS = (4, 8)   # the widths a searchable layer may take
FIXED_BITS = 8        # the first layer (it reads the 8-bit image) and the last keep 8 bits (Appendix H)


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str        # pandas dtype as stored
    stage: str        # the stage that adds it
    meaning: str


@dataclass(frozen=True)
class LayerColumns:
    """The names of the layer table's columns that exist once: `COL.<name>` is the string "<name>", so each
    name is written once, as a field here."""
    layer: str
    kind: str
    params: str
    macs: str
    product_macs: str
    narrow_product_macs: str
    act_elements: str
    group: str
    fixed_bits: str
    trace: str
    trace_stderr: str
    trace_samples: str
    trace_converged: str


COL = LayerColumns(**{f.name: f.name for f in fields(LayerColumns)})


def omega_col(b: int) -> str:
    return f"omega{b}"


def delta_col(b: int) -> str:
    return f"delta{b}"


def lat_col(b: int) -> str:
    return f"lat{b}_ms"


def glue_col(b: int) -> str:
    return f"glue{b}_ms"


COLUMNS = {c.name: c for c in (
    Column(COL.layer, "object", "layers", "qualified module name of the conv / linear layer"),
    Column(COL.kind, "object", "layers", "conv | linear"),
    Column(COL.params, "int64", "layers", "weight elements (BN folded into the conv: the conv's weight count)"),
    Column(COL.macs, "int64", "layers", "multiply-accumulates per sample"),
    Column(COL.product_macs, "int64", "layers", "multiply-accumulates per sample of the products of two "
                                                "activations whose operands both take this layer's bits "
                                                "(attention's q k^T after the qkv Linear); 0 if none"),
    Column(COL.narrow_product_macs, "int64", "layers", "multiply-accumulates per sample of the products of an "
                                                       "activation at this layer's bits and 8-bit codes "
                                                       "(softmax's probabilities times v); 0 if none"),
    Column(COL.act_elements, "int64", "layers", "elements of one sample's activation the layer reads, held at the "
                                                "layer's bits (activations are quantized to the bits of the layer "
                                                "that reads them); what the activation-memory budgets count"),
    Column(COL.group, "object", "layers", "layers with the same non-empty group share their bits (a shortcut "
                                          "conv and the conv beside it); '' for none"),
    Column(COL.fixed_bits, "Int64", "layers", "bits the layer must keep (first and last layer: 8); <NA> when the "
                                              "solver chooses"),
    Column(COL.trace, "float64", "sensitivity", "Hutchinson estimate of Tr(H_i), the layer's Hessian block"),
    Column(COL.trace_stderr, "float64", "sensitivity", "standard error of `trace`"),
    Column(COL.trace_samples, "int64", "sensitivity", "Hessian-vector products the estimate averages"),
    Column(COL.trace_converged, "bool", "sensitivity", "relative standard error reached the tolerance"),
    *(Column(delta_col(b), "float64", "sensitivity", f"||Q_{b}(W) - W||^2 of the BN-folded weight")
      for b in BIT_WIDTHS),
    *(Column(omega_col(b), "float64", "sensitivity", f"Omega_i at {b} bits (HAWQ-V3 Eq. 8)") for b in BIT_WIDTHS),
    *(Column(lat_col(b), "float64", "latency", f"ms of the layer's kernel(s) at {b} bits, glue charged to it")
      for b in BIT_WIDTHS),
    *(Column(glue_col(b), "float64", "latency", f"the part of {lat_col(b)} spent in glue kernels")
      for b in BIT_WIDTHS),
    Column(lat_col(32), "float64", "latency", "ms of the layer's torch fp32 module alone (the reference)"),
)}
LATENCY_COLUMNS = tuple(lat_col(b) for b in (*BIT_WIDTHS, 32))   # what the ILP's table takes from the latency stage
STAGE_COLUMNS = {stage: [c.name for c in COLUMNS.values() if c.stage == stage]
                 for stage in dict.fromkeys(c.stage for c in COLUMNS.values())}


def searchable(table: pd.DataFrame) -> pd.Series:
    """True for the layers whose bits the solver chooses."""
    return table[COL.fixed_bits].isna() if COL.fixed_bits in table else pd.Series(True, index=table.index)


def check_table(table: pd.DataFrame, bits: Sequence[int] = BIT_WIDTHS) -> pd.DataFrame:
    """The table, checked for what the solver reads, with `group` as str ('' = none), `fixed_bits` as Int64
    (<NA> = searchable) and the numeric columns as float; raises TableError naming the column and layer.

    Needed: layer, params, macs, and the sensitivity (omega{b} for every candidate width b, or trace and
    delta{b}); lat{b}_ms, when present, for every width; act_elements, when present, >= 0."""
    if not isinstance(table, pd.DataFrame):
        raise TableError(f"layer table: expected a pandas DataFrame, got {type(table).__name__}")
    sens = [omega_col(b) for b in bits]
    if not all(c in table for c in sens):
        sens = [COL.trace] + [delta_col(b) for b in bits]
    need = [COL.layer, COL.params, COL.macs] + sens
    missing = [c for c in need if c not in table]
    if missing:
        c = missing[0]
        close = difflib.get_close_matches(c, [str(x) for x in table.columns], n=1)
        hint = f" (found {close[0]!r}: misspelt?)" if close else ""
        raise TableError(f"layer table: missing column {c!r}{hint}; needed: {', '.join(need)} "
                         f"(or {omega_col(bits[0])}.. instead of trace and delta)")
    t = table.reset_index(drop=True).copy()
    if len(t) == 0:
        raise TableError("layer table: no rows")
    names = t[COL.layer]
    if names.isna().any() or (names.astype(str).str.strip() == "").any():
        raise TableError(f"layer table: column {COL.layer!r} has an empty name")
    t[COL.layer] = names.astype(str)
    dup = t[COL.layer][t[COL.layer].duplicated()]
    if len(dup):
        raise TableError(f"layer table: layer {dup.iloc[0]!r} appears twice; layer names must be unique")
    for c in (COL.product_macs, COL.narrow_product_macs):
        if c not in t:       # a table written before the column, or by hand: no such products
            t[c] = 0
    t[COL.group] = _group_column(t)
    t[COL.fixed_bits] = _fixed_bits_column(t, bits)
    fixed = t[COL.fixed_bits].notna().to_numpy()
    lat = [lat_col(b) for b in bits if lat_col(b) in t]
    acts = [COL.act_elements] if COL.act_elements in t else []   # older tables lack it: no activation budgets
    for c in [COL.params, COL.macs] + sens + lat + acts:
        v = pd.to_numeric(t[c], errors="coerce").to_numpy(float)
        bad_nan = np.isnan(v) & ~(fixed & (c in sens))   # a fixed layer's sensitivity is never used
        bad = bad_nan | np.isinf(v) | (v < 0) | ((v <= 0) if c == COL.params else False)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "> 0" if c == COL.params else ">= 0"
            shown = t[c][i].item() if hasattr(t[c][i], "item") else t[c][i]
            raise TableError(f"layer table: column {c!r} of layer {t[COL.layer][i]!r} is {shown!r}; "
                             f"it must be a finite number {what}")
        t[c] = v
    if 0 < len(lat) < len(bits):
        raise TableError(f"layer table: latency columns {lat} found but not "
                         f"{[lat_col(b) for b in bits if lat_col(b) not in t]}; give one per bit width")
    _check_groups(t)
    return t


def _group_column(t: pd.DataFrame) -> pd.Series:
    if COL.group not in t:
        return pd.Series([""] * len(t))
    g = t[COL.group]
    return g.where(g.notna(), "").map(lambda x: str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)
                                      ).str.strip()


def _fixed_bits_column(t: pd.DataFrame, bits: Sequence[int]) -> pd.Series:
    if COL.fixed_bits not in t:
        return pd.Series(pd.NA, index=t.index, dtype="Int64")
    out = []
    for name, v in zip(t[COL.layer], t[COL.fixed_bits]):
        if (not isinstance(v, str) and pd.isna(v)) or (isinstance(v, str) and not v.strip()):
            out.append(pd.NA)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if not f.is_integer() or int(f) not in bits:
            raise TableError(f"layer table: fixed_bits of layer {name!r} is {v!r}; "
                             f"it must be empty or one of {list(bits)}")
        out.append(int(f))
    return pd.Series(out, index=t.index, dtype="Int64")


def _check_groups(t: pd.DataFrame) -> None:
    grouped = t[t[COL.group] != ""]
    for g, rows in grouped.groupby(COL.group, sort=False):
        if rows[COL.fixed_bits].astype("float").fillna(0).nunique() > 1:
            desc = ", ".join(f"{n}={'empty' if pd.isna(f) else f}"
                             for n, f in zip(rows[COL.layer], rows[COL.fixed_bits]))
            raise TableError(f"layer table: group {g!r} disagrees on fixed_bits ({desc}); "
                             f"layers of a group must all be searchable or all fixed to the same bits")
