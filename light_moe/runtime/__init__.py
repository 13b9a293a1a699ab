"""Host <-> device copies shared by the executor, the engine and expert parallelism: below all of them
(docs/architecture.md, import rules), so none has to import another's internals for a copy."""
