"""``python -m dft.data <command>``.

Commands:
  build   turn a folder of papers (PDF, Markdown, text, JSONL) into a domain: CPT text, SFT messages,
          DPO/ORPO preference pairs and conf/data/<name>.yaml. Hydra overrides follow, e.g.
            python -m dft.data build source=papers/ name=silk
            python -m dft.data build source=papers/ name=silk generator=openai generator.model=gpt-4o-mini
          `python -m dft.data build --help` lists every option (conf/databuild/build.yaml).

(The shipped materials domain is built by `python -m dft.data.prepare`.)
"""

from __future__ import annotations

import sys

COMMANDS = ("build",)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)} (python -m dft.data --help)",
              file=sys.stderr)
        return 2
    if not any(a.startswith("-") for a in rest):  # not --help / --cfg / -m: the two required keys must be there
        missing = [k for k in ("source", "name") if not any(a.split("=", 1)[0].lstrip("+~") == k for a in rest)]
        if missing:
            print(f"error: build needs {' and '.join(f'{k}=...' for k in missing)} "
                  "(e.g. python -m dft.data build source=papers/ name=silk)", file=sys.stderr)
            return 2
    # Hydra reads its overrides from sys.argv; the program name it prints in --help is argv[0].
    sys.argv = ["python -m dft.data build"] + rest
    from dft.databuild.cli import main as build_main

    build_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
