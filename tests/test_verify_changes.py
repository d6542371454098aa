"""Verification says which images an int8 file classifies differently, as how undecided the float model was on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetl import verify
from edgetl.formats import softmax

# four test images; the float model is sure of images 0 and 2, nearly undecided on 1 and 3
REFERENCE = np.array([[4.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 5.0, 0.0], [0.0, 0.5, 0.45]], dtype=np.float32)
LABELS = np.array([0, 0, 1, 1])
INT8 = np.array([[3.9, 0.1, 0.0], [0.9, 1.0, 0.0], [0.1, 4.8, 0.0], [0.0, 0.44, 0.47]], dtype=np.float32)


def gap(row: np.ndarray) -> float:
    ordered = np.sort(softmax(row[None])[0])
    return float(ordered[-1] - ordered[-2])


def test_the_changed_images_and_the_float_models_top_two_gap_on_them_are_counted() -> None:
    row = verify.compare(INT8, REFERENCE, LABELS)
    assert row["changed"] == 2 and row["agreement"] == 0.5
    assert row["top1"] == 0.5  # images 1 and 3 lose their right class
    gaps = sorted([gap(REFERENCE[1]), gap(REFERENCE[3])])
    assert row["changed_reference_gap"]["max"] == pytest.approx(gaps[1], abs=1e-6)
    assert row["changed_reference_gap"]["median"] == pytest.approx(np.median(gaps), abs=1e-6)
    assert gaps[1] < 0.05 < gap(REFERENCE[0])
    assert "changed_reference_gap" not in verify.compare(REFERENCE, REFERENCE, LABELS)


def test_the_line_under_the_table_and_the_failure_message_say_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez(tmp_path / verify.TEST_INPUTS, x=np.zeros((4, 8, 8, 3), np.float32), y=LABELS)
    np.savez(tmp_path / verify.FLOAT_REFERENCE, logits=REFERENCE)
    outputs = {"m-fp32.tflite": REFERENCE, "m-int8.tflite": INT8}
    monkeypatch.setattr(verify.formats, "run", lambda path, x, threads, fmt: outputs[Path(path).name])
    record = verify.verify_artifacts(tmp_path, [{"file": name, "format": "tflite", "quant": name.split("-")[1][:4]}
                                                for name in outputs])
    medians = np.median([gap(r) for r in REFERENCE])
    assert record["reference_gap_median"] == pytest.approx(medians, abs=1e-6)
    fp32, int8 = record["rows"]
    assert fp32["changed"] == 0 and verify.changed_line(fp32, record) is None
    line = verify.changed_line(int8, record)
    assert line.startswith("m-int8.tflite: 2 of 4 test images change class")
    assert f"against {100 * medians:.1f} on all test images" in line
    verify.store(tmp_path, record)
    assert "m-int8.tflite: 2 of 4 test images change class" in (tmp_path / verify.VERIFICATION_TXT).read_text()
    with pytest.raises(verify.QualityError, match=r"fell 50\.0 points.*\(m-int8\.tflite: 2 of 4 test images change "
                                                  r"class; on them the float checkpoint's top two classes were"):
        verify.check_drop(record, 0.5)
