"""SECDED (72,64) Hamming code and word parity over the stored codes of a weight tensor.

A tensor's element codes (the low `bits` bits of each) are packed into 64-bit words in
little-endian element order: word w holds elements w*k .. w*k+k-1 with k = 64 // bits,
element j of the word in bits j*bits .. j*bits+bits-1 (2 fp32 codes per word, 4 bf16,
8 fp8/int8); a last partial word is padded with zeros.

The (72,64) code is an extended Hamming code: the 64 data bits sit at the positions
1..71 that are not powers of two, seven check bits at positions 1, 2, 4, .., 64 make the
XOR of the positions of all set bits zero, and an eighth bit is the parity of the other 71.
Decoding recomputes the syndrome (XOR of the positions of the set data bits, with the
stored check bits) and the overall parity: a single flipped bit gives odd parity and its
position as syndrome (corrected); two flipped bits give even parity and a non-zero
syndrome (detected, never miscorrected). Three or more flips in one word may be
miscorrected: odd parity with a syndrome that names a third, unflipped bit, which the
decoder then flips (or a check bit, leaving the data wrong); such faults count as neither
corrected nor detected. Faults are assumed to strike data bits only: the check bits are
stored and read back intact.
"""

from __future__ import annotations

import numpy as np
import torch

WORD = 64
# Codeword positions (1..71) of the 64 data bits: those that are not powers of two.
DATA_POS = np.array([p for p in range(1, 72) if p & (p - 1)], dtype=np.uint8)
assert DATA_POS.size == WORD
# Data bit at each syndrome value (-1: a check-bit position, 0, or no position at all).
_BIT_AT = np.full(128, -1, dtype=np.int64)
_BIT_AT[DATA_POS] = np.arange(WORD)
_SHIFTS = np.arange(WORD, dtype=np.uint64)

# decode() status per word.
CLEAN, CORRECTED, DETECTED = 0, 1, 2


def per_word(bits: int) -> int:
    """Element codes of `bits` bits held in one 64-bit word."""
    if not 1 <= bits <= WORD:
        raise ValueError(f"element codes must have 1 to 64 bits, got {bits}")
    return WORD // bits


def _unsigned(codes, bits: int) -> np.ndarray:
    c = torch.as_tensor(codes).reshape(-1).to(torch.int64).numpy().astype(np.uint64)
    return c & np.uint64((1 << bits) - 1) if bits < WORD else c


def pack(codes, bits: int) -> np.ndarray:
    """Element codes (int32/int64, low `bits` bits used) as uint64 words (see module doc)."""
    c = _unsigned(codes, bits)
    k = per_word(bits)
    padded = np.zeros(-(-c.size // k) * k, dtype=np.uint64)
    padded[:c.size] = c
    lanes = padded.reshape(-1, k) << (np.arange(k, dtype=np.uint64) * np.uint64(bits))
    return np.bitwise_or.reduce(lanes, axis=1) if k > 1 else lanes[:, 0]


def unpack(words: np.ndarray, bits: int, count: int) -> torch.Tensor:
    """The first `count` element codes of `words` (pack's inverse) as int32: a 32-bit code
    as the int32 of its pattern, narrower ones as their unsigned value."""
    k = per_word(bits)
    lanes = np.asarray(words, dtype=np.uint64)[:, None] >> (
        np.arange(k, dtype=np.uint64) * np.uint64(bits))
    lanes = (lanes & np.uint64((1 << bits) - 1)).reshape(-1)[:count]
    lanes = lanes.astype(np.uint32).view(np.int32) if bits == 32 else lanes.astype(np.int32)
    return torch.from_numpy(lanes)


def _data_bits(words: np.ndarray) -> np.ndarray:
    return ((words[:, None] >> _SHIFTS) & np.uint64(1)).astype(np.uint8)  # [n, 64]


def _parity(values: np.ndarray) -> np.ndarray:
    """Parity (0/1) of each unsigned integer."""
    v = values.astype(np.uint64)
    out = np.zeros(v.shape, dtype=np.uint8)
    for s in range(WORD):
        out ^= ((v >> np.uint64(s)) & np.uint64(1)).astype(np.uint8)
    return out


def _syndrome(words: np.ndarray) -> np.ndarray:
    """XOR of the codeword positions of the set data bits of each word (7 bits)."""
    return np.bitwise_xor.reduce(_data_bits(words) * DATA_POS, axis=1).astype(np.uint8)


def encode(words: np.ndarray) -> np.ndarray:
    """The 8 check bits of each word (uint8): Hamming bits 0-6, overall parity bit 7."""
    words = np.asarray(words, dtype=np.uint64).reshape(-1)
    hamming = _syndrome(words)
    overall = _parity(words) ^ _parity(hamming)
    return hamming | (overall << 7)


def decode(words: np.ndarray, check: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(decoded words, status) of words read back with their stored check bits; status is
    CLEAN (no error seen), CORRECTED (one bit flipped back, or an error in a check bit)
    or DETECTED (uncorrectable: even parity with a non-zero syndrome, or a syndrome naming
    no bit)."""
    words = np.asarray(words, dtype=np.uint64).reshape(-1)
    check = np.asarray(check, dtype=np.uint8).reshape(-1)
    hamming, overall = check & 0x7F, check >> 7
    s = _syndrome(words) ^ hamming
    odd = (_parity(words) ^ _parity(hamming) ^ overall).astype(bool)
    status = np.full(words.shape, CLEAN, dtype=np.int8)
    status[odd] = CORRECTED
    status[~odd & (s != 0)] = DETECTED
    bit = _BIT_AT[s]
    # Odd parity with a syndrome beyond position 71 names no bit: uncorrectable.
    status[odd & (s > 71)] = DETECTED
    fix = odd & (bit >= 0)
    out = words.copy()
    out[fix] ^= np.uint64(1) << bit[fix].astype(np.uint64)
    return out, status


def _fault_words(original, index, faulty, bits):
    """For element faults (flat `index`, faulty element codes `faulty`), the original and
    faulty 64-bit word holding each faulted element."""
    k = per_word(bits)
    original = torch.as_tensor(original).reshape(-1)
    index = torch.as_tensor(index).reshape(-1).cpu().to(torch.int64)
    # Only the words faults land in are packed: element w*k + j is lane j of word w.
    members = (index // k * k)[:, None] + torch.arange(k)
    inside = members < original.numel()
    lanes = torch.where(inside, original[members.clamp(max=original.numel() - 1)], 0)
    old = pack(lanes, bits)
    index = index.numpy()
    shift = ((index % k) * bits).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1) if bits < WORD else np.uint64(0xFFFFFFFFFFFFFFFF)
    new = (old & ~(mask << shift)) | (_unsigned(faulty, bits) << shift)
    return old, new


def ecc_read(original, index, faulty, bits: int):
    """What a SECDED-protected memory hands back for each element fault: (corrected,
    detected, read, spill) numpy arrays. read: the faulted element's code as decoded (the
    low `bits` bits; the faulty code when the decoder left it alone, the original when it
    corrected it, another code when it miscorrected a bit of this element); spill: the
    decoder changed another element of the word (a miscorrection landing next door)."""
    old, new = _fault_words(original, index, faulty, bits)
    decoded, status = decode(new, encode(old))
    corrected = (status == CORRECTED) & (decoded == old) & (new != old)
    detected = status == DETECTED
    index = torch.as_tensor(index).reshape(-1).cpu().numpy().astype(np.int64)
    shift = ((index % per_word(bits)) * bits).astype(np.uint64)
    lane = np.uint64((1 << bits) - 1) if bits < WORD else np.uint64(0xFFFFFFFFFFFFFFFF)
    read = ((decoded >> shift) & lane).astype(np.int64)
    spill = ((decoded ^ old) & ~(lane << shift)) != 0
    return corrected, detected, read, spill


def ecc_memory(old_words, new_words):
    """SECDED for protect.registry.Kind.memory: the check bits that differ between the old
    and new words' codes (what a silent rewrite must flip beside the data), and decode()
    of the new words with the old check bits (decoded words, detected)."""
    old = np.asarray(old_words, dtype=np.uint64).reshape(-1)
    new = np.asarray(new_words, dtype=np.uint64).reshape(-1)
    delta = encode(old) ^ encode(new)
    rewrite = np.unpackbits(delta[:, None], axis=1).sum(1).astype(np.int64)
    decoded, status = decode(new, encode(old))
    return rewrite, decoded, status == DETECTED


def parity_memory(old_words, new_words):
    """Parity for protect.registry.Kind.memory: the parity bit flips when an odd number of
    data bits did; nothing is corrected, an odd change is detected."""
    old = np.asarray(old_words, dtype=np.uint64).reshape(-1)
    new = np.asarray(new_words, dtype=np.uint64).reshape(-1)
    odd = (_parity(old) ^ _parity(new)).astype(bool)
    return odd.astype(np.int64), new.copy(), odd


def ecc_classify(original, index, faulty, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(corrected, detected) boolean arrays, one per fault: element `index[i]` of the flat
    code tensor `original` read back as `faulty[i]` (the rest of its word intact).

    corrected: the word changed and the SECDED decoder restores it exactly; detected: the
    decoder flags an uncorrectable word. Neither: a fault that changed no bit, or a
    miscorrected or unnoticed word."""
    corrected, detected, _, _ = ecc_read(original, index, faulty, bits)
    return corrected, detected


def parity_classify(original, index, faulty, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(corrected, detected) for one parity bit per 64-bit word: an odd number of flipped
    bits is detected; nothing is corrected (all False)."""
    old, new = _fault_words(original, index, faulty, bits)
    stored = _parity(old)
    detected = (_parity(new) ^ stored).astype(bool)
    return np.zeros_like(detected), detected

