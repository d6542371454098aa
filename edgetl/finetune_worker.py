"""What each process that torchrun starts for `edgetl finetune --devices N` runs.

The launching process hands over the resolved config as JSON (every field, including ones the CLI does
not expose), so workers train exactly what was asked; errors end the worker as the CLI would (one line
and the status edgetl.errors gives it), and torchrun passes the status back to the launcher.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from edgetl.config import FinetuneConfig
from edgetl.errors import EXIT_OK, exit_status, forget_interrupt, is_interruption, watch_interrupts


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config_file, run_dir = [a for a in args if not a.startswith("--")]
    from edgetl.finetune import run_finetune

    config = FinetuneConfig.from_json(json.loads(Path(config_file).read_text()))
    watch_interrupts()
    try:
        run_finetune(config, Path(run_dir))
    except SystemExit:
        raise
    except BaseException as error:
        known = exit_status(error)
        if known is None:
            raise
        if os.environ.get("EDGETL_DEBUG") == "1":
            traceback.print_exception(error)
        if not getattr(error, "reported_by_main", False):
            print(f"edgetl: error (rank {os.environ.get('RANK', '0')}): {known[1]}", file=sys.stderr)
        if is_interruption(known[0]):
            forget_interrupt()
        return known[0]
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
