"""Stage 3: the teacher scores the student's own prefixes."""

from opd.teacher.local import LocalTeacher

__all__ = ["LocalTeacher"]
