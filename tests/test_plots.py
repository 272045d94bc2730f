"""Figure specs read against their tables: a ``where`` filter that matches nothing is an error
naming the option, the value and the values the table holds, not a blank figure."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline import io
from pipeline.plots import draw


def test_a_where_filter_matching_no_row_is_an_error_not_a_blank_figure(tmp_path):
    table = tmp_path / "recovery.parquet"
    io.write_parquet(
        table,
        pd.DataFrame(
            {"problem": ["toy_relu", "digits"], "layer": ["fc1", "fc1"], "teacher_width": [4, 32]}
        ),
    )
    pdf, png = tmp_path / "f.pdf", tmp_path / "f.png"
    spec = {"kind": "recovery_widths", "where": {"problem": "toy_tanh"}}
    with pytest.raises(ValueError, match=r"where\.problem: 'toy_tanh' matches no row") as err:
        draw("recovery_widths", table, None, spec, pdf, png)
    assert "'digits', 'toy_relu'" in str(err.value)
    assert not pdf.exists() and not png.exists()
