"""Runtime support shared by the stages."""
