"""`python -m charlm` runs the same CLI as the `charlm` command."""

from charlm.cli import main

main()
