"""The paper's consistency analyses: score/IoU agreement of test detections, the NMS audit
(Fig. 1) and the training-time curves of the harmonic factors and AIC (Fig. 3a, Fig. 4)."""

from harmonic.analysis.consistency import MatchedDetections, consistency_report, match_detections, nms_audit
from harmonic.analysis.training import TrainingDiagnostics

__all__ = ["MatchedDetections", "TrainingDiagnostics", "consistency_report", "match_detections", "nms_audit"]
