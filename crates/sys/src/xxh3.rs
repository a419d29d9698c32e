//! XXH3-64 (seed 0) of inputs longer than 240 bytes, with AVX-512 when the CPU has it.
//!
//! The page hash of `precopy-transfer` is XXH3-64, taken of every page at both ends of a
//! transfer. `twox-hash` picks AVX2 or SSE2 at run time; on a CPU with AVX-512 this module's
//! loop takes a 64-byte stripe in one 512-bit register instead of two 256-bit ones (on the
//! project's Xeon test machine ~1.6× as fast on a cached 4 KiB page:
//! `cargo bench -p precopy-transfer --bench page_hash`). The values are XXH3-64's, written
//! from the algorithm's description (accumulate 64-byte stripes into eight 64-bit lanes,
//! scramble the lanes after each 1 KiB block, fold them into one value); the tests of
//! `precopy-transfer`'s digest compare them with `twox-hash` on every length from 241 bytes
//! to 8 KiB and on large pages.
//!
//! Inputs of 240 bytes or fewer use other code paths of XXH3 and are not handled here.

/// XXH3's default secret (the algorithm's constant; seed 0 uses it as it is).
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

const PRIME32_1: u64 = 0x9E37_79B1;
const PRIME32_2: u64 = 0x85EB_CA77;
const PRIME32_3: u64 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;
const PRIME_MX1: u64 = 0x1656_6791_9E37_79F9;

/// Bytes of one stripe (one accumulation step over the eight lanes).
const STRIPE: usize = 64;
/// Stripes of one block: the secret advances 8 bytes per stripe over its first 128 bytes.
const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / 8;
const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;
/// Longest input XXH3 hashes by its short-input paths.
pub const SHORT_MAX: usize = 240;

/// Whether [`xxh3_64_long`] runs its AVX-512 loop on this CPU (checked once, then cached
/// by the standard library).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// XXH3-64 with seed 0 of `data`, computed with AVX-512; `None` if `data` is 240 bytes or
/// shorter (XXH3's short-input paths) or the CPU lacks AVX-512F.
#[inline]
pub fn xxh3_64_long(data: &[u8]) -> Option<u64> {
    if data.len() <= SHORT_MAX || !has_avx512() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F (checked just above), the only requirement of
        // `lanes_avx512` beyond its safe signature.
        let acc = unsafe { avx512::lanes(data) };
        Some(merge(&acc, data.len() as u64))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

fn read64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Folds the eight lanes into the hash of an input of `len` bytes.
fn merge(acc: &[u64; 8], len: u64) -> u64 {
    let mut h = len.wrapping_mul(PRIME64_1);
    for i in 0..4 {
        let at = 11 + 16 * i;
        let a = acc[2 * i] ^ read64(&SECRET, at);
        let b = acc[2 * i + 1] ^ read64(&SECRET, at + 8);
        let p = u128::from(a) * u128::from(b);
        h = h.wrapping_add(p as u64 ^ (p >> 64) as u64);
    }
    h ^= h >> 37;
    h = h.wrapping_mul(PRIME_MX1);
    h ^ (h >> 32)
}

/// The lanes' starting values.
const INIT: [u64; 8] = [
    PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
];

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BLOCK, INIT, PRIME32_1, SECRET, STRIPE};
    use std::arch::x86_64::*;

    /// Loads 64 bytes at `at` of `b` (bounds checked).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load(b: &[u8], at: usize) -> __m512i {
        let s: &[u8; 64] = b[at..at + 64].try_into().expect("64 bytes");
        // SAFETY: `s` is 64 readable bytes; the load has no alignment requirement.
        unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
    }

    /// The products of one stripe: for each lane, the low times the high half of its input
    /// word XOR the secret's word.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn product(d: __m512i, key: __m512i) -> __m512i {
        let k = _mm512_xor_si512(d, key);
        _mm512_mul_epu32(k, _mm512_srli_epi64::<32>(k))
    }

    /// After each block: every lane `(acc ^ acc >> 47 ^ key) * PRIME32_1` (mod 2^64).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scramble(acc: __m512i) -> __m512i {
        let k = load(&SECRET, SECRET.len() - STRIPE);
        let x = _mm512_xor_si512(_mm512_xor_si512(acc, _mm512_srli_epi64::<47>(acc)), k);
        let prime = _mm512_set1_epi64(PRIME32_1 as i64);
        let lo = _mm512_mul_epu32(x, prime);
        let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(x), prime);
        _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi))
    }

    /// Accumulates `stripes` (64 bytes each), the `s`th with the secret at `8 * s`, into
    /// `acc`. Each lane adds its product ([`product`]) and its neighbour's input word (lanes
    /// 2k and 2k+1 swapped): the input words are summed first and swapped once, which is
    /// the same sum (mod 2^64) for one shuffle instead of one per stripe.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn stripes(acc: __m512i, stripes: &[u8]) -> __m512i {
        let mut products = _mm512_setzero_si512();
        let mut words = _mm512_setzero_si512();
        for (s, stripe) in stripes.chunks_exact(STRIPE).enumerate() {
            let d = load(stripe, 0);
            products = _mm512_add_epi64(products, product(d, load(&SECRET, s * 8)));
            words = _mm512_add_epi64(words, d);
        }
        // The two 64-bit lanes of each 128 bits swapped (words 2, 3, 0, 1: 0b01_00_11_10).
        let swapped = _mm512_shuffle_epi32::<0x4E>(words);
        _mm512_add_epi64(acc, _mm512_add_epi64(products, swapped))
    }

    /// The eight lanes after every stripe of `data` (longer than 240 bytes, so at least one
    /// whole stripe).
    #[target_feature(enable = "avx512f")]
    pub(super) fn lanes(data: &[u8]) -> [u64; 8] {
        let len = data.len();
        let init = INIT.map(|v| v as i64);
        // SAFETY: `init` is 64 readable bytes; no alignment requirement.
        let mut acc = unsafe { _mm512_loadu_si512(init.as_ptr().cast()) };
        // Whole blocks, each followed by a scramble; the last byte always falls after them.
        let blocks = (len - 1) / BLOCK;
        for block in data[..blocks * BLOCK].chunks_exact(BLOCK) {
            acc = scramble(stripes(acc, block));
        }
        // The whole stripes of the rest, except one ending at the last byte.
        let tail = blocks * BLOCK;
        let whole = (len - 1 - tail) / STRIPE;
        acc = stripes(acc, &data[tail..tail + whole * STRIPE]);
        // The last 64 bytes (overlapping the stripes before), with the secret at 121.
        let d = load(data, len - STRIPE);
        let key = load(&SECRET, SECRET.len() - STRIPE - 7);
        let last = _mm512_add_epi64(product(d, key), _mm512_shuffle_epi32::<0x4E>(d));
        acc = _mm512_add_epi64(acc, last);
        let mut out = [0u64; 8];
        // SAFETY: `out` is 64 writable bytes; no alignment requirement.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), acc) };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scalar reference of the same lanes, to check the vector loop against.
    fn lanes_scalar(data: &[u8]) -> [u64; 8] {
        let mut acc = INIT;
        let stripe = |acc: &mut [u64; 8], at: usize, key: usize| {
            for i in 0..8 {
                let v = read64(data, at + 8 * i);
                let k = v ^ read64(&SECRET, key + 8 * i);
                acc[i ^ 1] = acc[i ^ 1].wrapping_add(v);
                acc[i] = acc[i].wrapping_add((k & 0xFFFF_FFFF) * (k >> 32));
            }
        };
        let len = data.len();
        let blocks = (len - 1) / BLOCK;
        for b in 0..blocks {
            for s in 0..STRIPES_PER_BLOCK {
                stripe(&mut acc, b * BLOCK + s * STRIPE, s * 8);
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let k = read64(&SECRET, SECRET.len() - STRIPE + 8 * i);
                *a = ((*a ^ (*a >> 47)) ^ k).wrapping_mul(PRIME32_1);
            }
        }
        let tail = blocks * BLOCK;
        for s in 0..(len - 1 - tail) / STRIPE {
            stripe(&mut acc, tail + s * STRIPE, s * 8);
        }
        stripe(&mut acc, len - STRIPE, SECRET.len() - STRIPE - 7);
        acc
    }

    #[test]
    fn vector_lanes_match_the_scalar_reference() {
        if !has_avx512() {
            println!("SKIP: this CPU has no AVX-512F; the vector loop cannot run here");
            return;
        }
        let mut x: u64 = 0x0123_4567_89AB_CDEF;
        let data: Vec<u8> = (0..9000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for len in [
            241, 255, 256, 1023, 1024, 1025, 2048, 4095, 4096, 4097, 9000,
        ] {
            // SAFETY: AVX-512F checked above.
            let v = unsafe { avx512::lanes(&data[..len]) };
            assert_eq!(v, lanes_scalar(&data[..len]), "length {len}");
        }
    }

    #[test]
    fn short_inputs_are_left_to_the_caller() {
        assert_eq!(xxh3_64_long(&[7u8; 240]), None);
    }
}
