"""How runs start and how they are looked at: recipes, start-up checks, `erc-verl train`, `eval`, `submit` and
`jobs`, the cluster smoke check, the metrics file and the end-of-run report. Free of verl at import: modules
import verl where they need it, so the command line starts fast."""
