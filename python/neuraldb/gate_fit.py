"""What is fitted after editing by default: per-row thresholds from the database's own facts, then the subject gate.

``neuraldb edit``, ``neuraldb eval`` and ``neuraldb serve`` call :func:`fit_defaults` after their facts are in
(``--no-calibrate`` skips it); ``neuraldb calibrate`` fits thresholds on text and changes the gate only when asked.
"""

from __future__ import annotations

from neuraldb import calibration
from neuraldb.calibration import CalibrationReport
from neuraldb.subject_gate import DEFAULT_RHO, enable_subject_gate

__all__ = ["fit_defaults"]


def fit_defaults(model, tok, db) -> tuple[CalibrationReport, int | None]:
    """Per-row thresholds from ``db``'s own facts (:func:`neuraldb.calibration.calibrate` without text), then the
    subject gate at :data:`neuraldb.subject_gate.DEFAULT_RHO` (or the rho it already has), unless ``db`` has a gate
    that looks ahead (the relation gate holds the key slot). Returns the calibration report and the number of rows
    given a previous-token key (None: the gate was left as it was).

    Example::

        >>> report, keyed = fit_defaults(model, tok, db)     # doctest: +SKIP
    """
    report = calibration.calibrate(model, tok, db, None)
    gate = db.relation_gate
    if gate is not None and gate.get("offset", 0) + gate["window"] >= 0:
        return report, None
    return report, enable_subject_gate(model, tok, db, rho=DEFAULT_RHO if gate is None else gate["rho"])
