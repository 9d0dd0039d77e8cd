from potstill.teachers.base import Teacher, TeacherOutput
from potstill.teachers.local import LocalTeacher

__all__ = ["Teacher", "TeacherOutput", "LocalTeacher"]
