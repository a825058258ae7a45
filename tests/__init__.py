from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"  # the AIME 2024/2025 rows, in verl's format
