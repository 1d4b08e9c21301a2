"""Context-only serving benchmark, DWDP vs DEP (the main job).

  python -m experiments.context_bench                                   # tiny model, 4 virtual CPU devices
  python -m experiments.context_bench --config=configs/context_bench.py:r1_width_4gpu --config.workload.input_ratio=0.5

Bad input (an unknown config field, a value of the wrong type, a value the benchmark does not accept) exits 2 with
a one-line message, before the JAX backend starts.
"""

import difflib
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from dwdp_jax import bench, profiling, report, validation

DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "context_bench.py")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def invalid(message: str) -> None:
    print(f"context_bench: invalid input: {message}", file=sys.stderr)
    sys.exit(2)


def config_spec(argv: list[str]) -> str:
    """The --config value on the command line (path[:NAME]), else the default file."""
    for i, arg in enumerate(argv):
        if re.match(r"^--?config=", arg):
            return arg.split("=", 1)[1]
        if re.match(r"^--?config$", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def load_config(spec: str):
    """The config --config names, loaded as ml_collections loads it: the file's get_config(NAME)."""
    path, _, name = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("context_bench_config", path)
    if module_spec is None:
        raise ValueError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(name) if name else module.get_config()


def leaf_fields(c, prefix: str = "") -> list[str]:
    fields = []
    for key, value in c.items():
        fields += leaf_fields(value, f"{prefix}{key}.") if hasattr(value, "items") else [prefix + key]
    return fields


def check_command_line(argv: list[str]) -> None:
    """Exits 2 when the config does not load or a --config.x override names a field it does not have (with its
    nearest fields): ml_collections raises a traceback there, at import when --config is not given."""
    spec = config_spec(argv)
    try:
        known = leaf_fields(load_config(spec))
    except (OSError, ValueError) as e:
        invalid(f"--config={spec}: {e}")
    for name in (m.group(1) for m in map(_OVERRIDE.match, argv) if m):
        if name not in known:
            nearest = difflib.get_close_matches(name, known, n=3, cutoff=0.0)
            invalid(f"--config.{name}: no such config field; nearest: " + ", ".join(f"config.{k}" for k in nearest))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, a bad value (--config.num_ranks=two) exiting 2 in one line like every other bad input."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        invalid(str(e))


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    c = _CONFIG.value
    try:  # before the backend starts: the config sets what it reads, and devices cost time
        validation.validate(c)
    except ValueError as e:
        invalid(str(e))
    bench.configure_backend(c)
    try:
        if c.trace:  # the trace names HLO instructions; the dump maps them to their named scopes (stage_trace)
            profiling.start_trace_dump(c.trace)
        doc = bench.run(c)
    except ValueError as e:
        invalid(str(e))
    print(report.format_table(doc))
    failed = [name for name, v in doc["verification"].items() if not v["passed"]]
    if failed:
        print(f"context_bench: verification against the reference FAILED for {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    check_command_line(sys.argv[1:])
    _CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "benchmark config", lock_config=True)
    app.run(main, flags_parser=parse_flags)
