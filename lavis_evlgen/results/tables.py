"""The paper's tables filled with measurements: our mean ± std over seeds, the paper's number, and
the difference (ours - paper) in every cell; for the main table also every row as a multiple of
BLIP-2's, ours beside the paper's, because across scales only ratios compare (README, "BLIP-2 vs
EVLGen: the paper's main comparison in miniature").
"""
from lavis_evlgen.experiments import report
from lavis_evlgen.results.paper import TABLES, PaperTable, paper_value, row_description
from lavis_evlgen.results.sources import Measurement, Source


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cell(values: list[float], paper) -> dict:
    """{"ours": mean_std or None, "paper": number/word or None, "difference": ours mean - paper or None}."""
    ours = report.mean_std(values) if values else None
    difference = ours["mean"] - _number(paper) if ours is not None and _number(paper) is not None else None
    return {"ours": ours, "paper": paper, "difference": difference}


def table_rows(table: PaperTable, measurements: list[Measurement], paper: dict) -> list[dict]:
    """Every paper row of ``table`` (in the paper's order), then the rows of ours it lacks (in the
    order measured), each with a cell per column."""
    extra = {}
    for m in measurements:
        if m.row not in table.rows:
            extra.setdefault(m.row, m.label or m.row)
    rows = []
    for key in [*table.rows, *extra]:
        label = row_description(table, key, paper) if key in table.rows else extra[key]
        cells = {column: cell([m.value for m in measurements if m.row == key and m.column == column],
                              paper_value(table, key, column, paper)) for column in table.columns}
        rows.append({"key": key, "label": label, "in_paper": key in table.rows, "cells": cells})
    return rows


def relative(table: PaperTable, rows: list[dict]) -> list[dict]:
    """Each measured row's cells as multiples of the reference row's (BLIP-2), ours and the paper's."""
    reference = next((r for r in rows if r["key"] == table.reference_row), None)
    if reference is None:
        return []
    out = []
    for row in rows:
        if row is reference:
            continue
        for column, c in row["cells"].items():
            ref = reference["cells"][column]
            if c["ours"] is None or ref["ours"] is None or not ref["ours"]["mean"]:
                continue
            paper, paper_ref = _number(c["paper"]), _number(ref["paper"])
            out.append({"row": row["key"], "label": row["label"], "column": column,
                        "ours": c["ours"]["mean"] / ref["ours"]["mean"],
                        "paper": paper / paper_ref if paper is not None and paper_ref else None})
    return out


def build(sources: list[Source], paper: dict, paper_file: str) -> dict:
    """The results document: every table with at least one measured cell, and what each source fed."""
    measurements = [m for s in sources for m in s.measurements]
    tables = {}
    for key, table in TABLES.items():
        own = [m for m in measurements if m.table == key]
        if not own:
            continue
        rows = table_rows(table, own, paper)
        tables[key] = {"title": table.title, "columns": table.columns, "rows": rows,
                       "relative_to": table.reference_row, "relative": relative(table, rows)}
    return {"paper_file": paper_file,
            "sources": [{"path": s.path, "what": s.description} for s in sources],
            "note": "cells: ours (mean ± std over seeds or runs) / paper (ours - paper); caption metrics x100, "
                    "accuracies in %, clock in hours",
            "tables": tables}


# Decimals shown per column (default 1): the mini runs train for minutes, a few hundredths of an hour.
DIGITS = {"clock_hours": 2}


def cell_text(c: dict, digits: int = 1) -> str:
    """``ours / paper (difference)``."""
    paper = "—" if c["paper"] is None else str(c["paper"])
    text = f"{report.fmt(c['ours'], digits)} / {paper}"
    return text + (f" ({c['difference']:+.{digits}f})" if c["difference"] is not None else "")


def markdown(result: dict) -> str:
    lines = ["# Results beside the paper", "",
             f"Paper numbers: `{result['paper_file']}`. {result['note'][0].upper()}{result['note'][1:]}; "
             "— where a side has no number.", "", "Sources:", ""]
    lines += [f"- `{s['path']}`: {s['what']}" for s in result["sources"]]
    for table in result["tables"].values():
        lines += ["", f"## {table['title']}", "",
                  report.markdown_table(["row", *table["columns"].values()],
                                        [[r["label"] + ("" if r["in_paper"] else " (not in the paper)"),
                                          *(cell_text(r["cells"][c], DIGITS.get(c, 1)) for c in table["columns"])]
                                         for r in table["rows"]])]
        if table["relative"]:
            lines += ["", f"As multiples of the `{table['relative_to']}` row (ours x / paper x):", "",
                      report.markdown_table(
                          ["row", "column", "ours", "paper"],
                          [[r["label"], table["columns"][r["column"]], f"{r['ours']:.2f}x",
                            "—" if r["paper"] is None else f"{r['paper']:.2f}x"] for r in table["relative"]])]
    return "\n".join(lines) + "\n"
