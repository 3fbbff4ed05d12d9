"""The top floor: the ``sieve`` command, the offline build and the assembled
config. It may import every stage; nothing imports it but tests (ARCHITECTURE.md)."""
