"""Teachers behind one interface (:mod:`potstill.teachers.base`): local models, LM models, offline stores."""
