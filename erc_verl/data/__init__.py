"""The paper's training and evaluation data as verl parquet (`python -m erc_verl.data --help`)."""

from erc_verl.data.prepare import INSTRUCTION, PROMPT_TEMPLATE, SOURCES, DataError, format_prompt, prepare

__all__ = ["INSTRUCTION", "PROMPT_TEMPLATE", "SOURCES", "DataError", "format_prompt", "prepare"]
