"""Knowledge distillation (the survey's section VI): losses, trainers and techniques.

Importing this package registers its techniques in ``TECHNIQUES``.
"""

from nncompress.distill import fskd as fskd  # registers fskd
from nncompress.distill import techniques as techniques  # registers kd_student, cs_kd
