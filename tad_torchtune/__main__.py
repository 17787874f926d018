"""``python -m tad_torchtune ls`` / ``cp NAME DEST``: see ``tad_torchtune.cli``."""

from tad_torchtune.cli import main

raise SystemExit(main())
