"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import tempfile  # noqa: E402

# Tokenizers generated for the default corpus are cached here for the whole session
# (subprocesses inherit it), never in the user's home.
os.environ.setdefault("LMJAX_CACHE", tempfile.mkdtemp(prefix="lmjax-test-cache-"))
