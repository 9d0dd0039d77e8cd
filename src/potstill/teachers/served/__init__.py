"""Teachers behind an OpenAI-compatible server (vLLM, ``potstill serve``): docs/served.md.

:mod:`.config` (the recipe keys) imports no HTTP library; :class:`.teacher.ServedTeacher` needs the
optional ``[serve]`` extra (httpx, tenacity).
"""

from potstill.teachers.served.config import DEFAULT_API_KEY_ENV, ServedTeacherKeys

__all__ = ["DEFAULT_API_KEY_ENV", "ServedTeacherKeys"]
