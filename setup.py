"""Wheel builds ship the compiled kernels: build_py compiles every kernel into the built package's _nbcache.

The locator of ``gguf_kquant/_jitcache.py`` keys entries by source content and a package-relative folder, so
the cache built here is valid once the wheel is installed (on a machine with the same CPU model and Numba
version; elsewhere an entry is a miss, compiled on first use as without it).  Editable installs skip this
(their source tree caches lazily); so does GGUF_KQUANT_NO_PRECOMPILE=1 (e.g. building an sdist-only release).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import time

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_kernel_cache(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or os.environ.get("GGUF_KQUANT_NO_PRECOMPILE"):
            return
        if importlib.util.find_spec("numba") is None:
            raise SystemExit("building gguf-kquant's kernel cache needs numba and numpy in the build environment "
                             "(pyproject.toml [build-system] requires), or GGUF_KQUANT_NO_PRECOMPILE=1")
        build_lib = os.path.abspath(self.build_lib)
        shutil.rmtree(os.path.join(build_lib, "gguf_kquant", "_nbcache"), ignore_errors=True)  # a stale build
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        # the built copy first, not the source tree (cwd is build_lib too); pip's build environment after it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (build_lib, env.get("PYTHONPATH")) if p)
        t0 = time.perf_counter()
        self.announce("compiling every kernel into gguf_kquant/_nbcache (minutes)", level=2)
        subprocess.run([sys.executable, "-c", "from gguf_kquant.precompile import build_cache; build_cache()"],
                       cwd=build_lib, env=env, check=True)
        self.announce(f"kernels compiled in {time.perf_counter() - t0:.0f} s", level=2)


setup(cmdclass={"build_py": build_py_with_kernel_cache})
