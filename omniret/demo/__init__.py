"""The offline tri-modal digits demo: data written as M-BEIR-format files, trained by the one `Trainer`,
evaluated, indexed. `omniret demo` (omniret/commands/demo.py) is its command line; docs/demo.md the details."""
