"""Stage 5: update the student (optimizer steps over one rollout batch)."""

from opd.update.sft import sft_loss, supervised_train
from opd.update.step import (make_optimizer, make_scheduler, student_token_terms, update_student,
                             use_config_hyperparameters)

__all__ = ["sft_loss", "supervised_train", "make_optimizer", "make_scheduler", "student_token_terms", "update_student",
           "use_config_hyperparameters"]
