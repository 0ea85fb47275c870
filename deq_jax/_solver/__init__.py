"""Forward solvers: one file each, one small interface (`_base.AbstractSolver`)."""
