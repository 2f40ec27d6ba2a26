"""Runtime pieces shared by every backend: the Kernel interface, fallbacks, the generated-code cache."""
