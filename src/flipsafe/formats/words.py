"""Codes packed into memory words: what a multi-bit upset in one stored word hits.

A memory word of W bits holds W / b codes of a b-bit format side by side, code 0 in the
low bits (four int8 weights in a 32-bit word, two fp16 ones, eight int8 in 64 bits). A
particle strike flips adjacent bits of the word, so a burst may cross from one code into
the next. `WordLayout` gives the word the shape of a format for the fault sampler: its
bits are the word's, and each field holds that field's bits of every code in the word.
Block formats (MX, bfp) keep a shared scale beside their blocks and are not packed here.
"""

from __future__ import annotations

from flipsafe.errors import ConfigError

WORD_BITS = (16, 32, 64)


class WordLayout:
    """`per_word` codes of `element` (a Format) in a `bits`-bit word."""

    def __init__(self, element, bits: int = 32):
        if bits not in WORD_BITS:
            raise ConfigError(f"a memory word is {', '.join(map(str, WORD_BITS))} bits wide; "
                              f"got {bits}")
        if element.block_size is not None or element.native:
            raise ConfigError(f"{element.name} codes are not packed into words here (block "
                              "formats keep a shared scale beside their blocks; a quantized "
                              "model's own storage is its runtime's)")
        if bits % element.bits:
            raise ConfigError(f"{bits}-bit words do not hold whole {element.bits}-bit "
                              f"{element.name} codes")
        self.element, self.bits = element, bits
        self.code_bits = element.bits
        self.per_word = bits // element.bits
        self.name = f"{element.name} x{self.per_word} in {bits}-bit words"
        self.fields = {f: tuple(e * self.code_bits + p for e in range(self.per_word)
                                for p in positions)
                       for f, positions in element.fields.items()}
        self.meta_fields: dict = {}  # metadata lives outside the weight words
        self.block_size = None
        self.native = False

    def words(self, codes: int) -> int:
        """Words holding `codes` codes (the last one partly filled)."""
        return -(-codes // self.per_word)
