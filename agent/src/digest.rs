//! SHA-256 of an upload and of each of its parts, in one pass over the bytes.
//!
//! An S3 upload hashes every byte twice: into the artifact's digest, and into its part's
//! digest, which SigV4 signs (`x-amz-content-sha256`). The two hashes read the same blocks
//! from different starting states, so they share the message schedule and the SHA-NI round
//! instructions of one can run while the other's are in flight: 0.65 GB/s for both on this
//! machine, against 0.53 GB/s hashing one after the other (the agent's CPU per GiB uploaded
//! went from 2.5 s to 2.1 s).
#![allow(unsafe_code)] // SHA-NI intrinsics, behind a CPU feature check

use sha2::digest::generic_array::GenericArray;

const BLOCK: usize = 64;

const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A SHA-256 in progress.
#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    /// Bytes hashed so far, the partial block's included.
    len: u64,
    /// The bytes of a block not yet complete: the first `len % 64`.
    partial: [u8; BLOCK],
}

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256 {
            state: INITIAL,
            len: 0,
            partial: [0; BLOCK],
        }
    }
}

impl Sha256 {
    pub fn update(&mut self, mut data: &[u8]) {
        let filled = self.filled();
        self.len += data.len() as u64;
        if filled > 0 {
            let taken = data.len().min(BLOCK - filled);
            self.partial[filled..filled + taken].copy_from_slice(&data[..taken]);
            data = &data[taken..];
            if filled + taken < BLOCK {
                return;
            }
            let block = self.partial;
            compress(&mut self.state, &block);
        }
        let whole = data.len() / BLOCK * BLOCK;
        compress(&mut self.state, &data[..whole]);
        self.partial[..data.len() - whole].copy_from_slice(&data[whole..]);
    }

    pub fn finish(mut self) -> [u8; 32] {
        let bits = self.len * 8;
        let filled = self.filled();
        let mut tail = [0u8; 2 * BLOCK];
        tail[..filled].copy_from_slice(&self.partial[..filled]);
        tail[filled] = 0x80;
        let end = if filled < BLOCK - 8 { BLOCK } else { 2 * BLOCK };
        tail[end - 8..end].copy_from_slice(&bits.to_be_bytes());
        compress(&mut self.state, &tail[..end]);
        let mut digest = [0u8; 32];
        for (bytes, word) in digest.chunks_exact_mut(4).zip(self.state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }

    fn filled(&self) -> usize {
        (self.len % BLOCK as u64) as usize
    }
}

/// Hashes `data` into both `a` and `b`, in one pass where both are at a block's start.
pub fn update_both(a: &mut Sha256, b: &mut Sha256, data: &[u8]) {
    if a.filled() != 0 || b.filled() != 0 {
        a.update(data);
        b.update(data);
        return;
    }
    let whole = data.len() / BLOCK * BLOCK;
    compress_both(&mut a.state, &mut b.state, &data[..whole]);
    a.len += whole as u64;
    b.len += whole as u64;
    a.update(&data[whole..]);
    b.update(&data[whole..]);
}

/// Runs whole `blocks` through `state`.
fn compress(state: &mut [u32; 8], blocks: &[u8]) {
    for block in blocks.chunks_exact(BLOCK) {
        sha2::compress256(state, &[*GenericArray::from_slice(block)]);
    }
}

fn compress_both(a: &mut [u32; 8], b: &mut [u32; 8], blocks: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("sha")
        && std::is_x86_feature_detected!("ssse3")
        && std::is_x86_feature_detected!("sse4.1")
    {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { shani::compress_both(a, b, blocks) };
        return;
    }
    compress(a, blocks);
    compress(b, blocks);
}

#[cfg(target_arch = "x86_64")]
mod shani {
    //! Two SHA-256 states over the same blocks, with Intel's SHA extensions: one message
    //! schedule, the rounds of both interleaved. Follows the sha2 crate's one-state version.
    use std::arch::x86_64::*;

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// The state as SHA-NI wants it: (ABEF, CDGH).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn load(state: &[u32; 8]) -> (__m128i, __m128i) {
        // SAFETY: `state` is 32 bytes; the loads are unaligned.
        let (dcba, efgh) = unsafe {
            let words = state.as_ptr().cast::<__m128i>();
            (_mm_loadu_si128(words), _mm_loadu_si128(words.add(1)))
        };
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let hgfe = _mm_shuffle_epi32(efgh, 0x1B);
        (
            _mm_alignr_epi8(cdab, hgfe, 8),
            _mm_blend_epi16(hgfe, cdab, 0xF0),
        )
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn store(state: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        // SAFETY: `state` is 32 bytes; the stores are unaligned.
        unsafe {
            let words = state.as_mut_ptr().cast::<__m128i>();
            _mm_storeu_si128(words, _mm_blend_epi16(feba, dchg, 0xF0));
            _mm_storeu_si128(words.add(1), _mm_alignr_epi8(dchg, feba, 8));
        }
    }

    /// `blocks` is whole 64-byte blocks.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub fn compress_both(a: &mut [u32; 8], b: &mut [u32; 8], blocks: &[u8]) {
        let big_endian = _mm_set_epi64x(
            0x0C0D_0E0F_0809_0A0B_u64 as i64,
            0x0405_0607_0001_0203_u64 as i64,
        );
        let (mut abef_a, mut cdgh_a) = load(a);
        let (mut abef_b, mut cdgh_b) = load(b);
        for block in blocks.chunks_exact(64) {
            let before = (abef_a, cdgh_a, abef_b, cdgh_b);
            // SAFETY: `block` is 64 bytes, read as four unaligned 16-byte words.
            let mut w = unsafe {
                let words = block.as_ptr().cast::<__m128i>();
                [
                    _mm_loadu_si128(words),
                    _mm_loadu_si128(words.add(1)),
                    _mm_loadu_si128(words.add(2)),
                    _mm_loadu_si128(words.add(3)),
                ]
            };
            for word in &mut w {
                *word = _mm_shuffle_epi8(*word, big_endian);
            }
            for i in 0..16 {
                if i >= 4 {
                    // The schedule's next four words replace the oldest four.
                    let t = _mm_sha256msg1_epu32(w[i % 4], w[(i + 1) % 4]);
                    let t = _mm_add_epi32(t, _mm_alignr_epi8(w[(i + 3) % 4], w[(i + 2) % 4], 4));
                    w[i % 4] = _mm_sha256msg2_epu32(t, w[(i + 3) % 4]);
                }
                let k = _mm_set_epi32(
                    K[4 * i + 3] as i32,
                    K[4 * i + 2] as i32,
                    K[4 * i + 1] as i32,
                    K[4 * i] as i32,
                );
                let low = _mm_add_epi32(w[i % 4], k);
                let high = _mm_shuffle_epi32(low, 0x0E);
                cdgh_a = _mm_sha256rnds2_epu32(cdgh_a, abef_a, low);
                cdgh_b = _mm_sha256rnds2_epu32(cdgh_b, abef_b, low);
                abef_a = _mm_sha256rnds2_epu32(abef_a, cdgh_a, high);
                abef_b = _mm_sha256rnds2_epu32(abef_b, cdgh_b, high);
            }
            abef_a = _mm_add_epi32(abef_a, before.0);
            cdgh_a = _mm_add_epi32(cdgh_a, before.1);
            abef_b = _mm_add_epi32(abef_b, before.2);
            cdgh_b = _mm_add_epi32(cdgh_b, before.3);
        }
        store(a, abef_a, cdgh_a);
        store(b, abef_b, cdgh_b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn noise(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 24) as u8)
            .collect()
    }

    #[test]
    fn one_hash_matches_sha2_at_every_length_around_the_blocks() {
        let data = noise(300, 1);
        for len in 0..data.len() {
            let mut hash = Sha256::default();
            hash.update(&data[..len]);
            assert_eq!(
                hash.finish()[..],
                sha2::Sha256::digest(&data[..len])[..],
                "{len}"
            );
        }
    }

    #[test]
    fn pieces_of_any_size_hash_as_one() {
        let data = noise(1000, 2);
        for piece in [1, 7, 63, 64, 65, 200] {
            let mut hash = Sha256::default();
            data.chunks(piece).for_each(|p| hash.update(p));
            assert_eq!(
                hash.finish()[..],
                sha2::Sha256::digest(&data)[..],
                "{piece}"
            );
        }
    }

    #[test]
    fn an_upload_and_its_parts_hash_in_one_pass() {
        // Parts of whole blocks, then a ragged one, then more after it (the slow path).
        let data = noise(5 * 4096 + 100, 3);
        for cuts in [
            vec![4096, 8192, 5 * 4096, 5 * 4096 + 100],
            vec![64, 4096 + 1, 4096 + 65, 5 * 4096 + 100],
            vec![5 * 4096 + 100],
        ] {
            let mut upload = Sha256::default();
            let mut start = 0;
            for end in cuts {
                let mut part = Sha256::default();
                update_both(&mut upload, &mut part, &data[start..end]);
                assert_eq!(
                    part.finish()[..],
                    sha2::Sha256::digest(&data[start..end])[..]
                );
                start = end;
            }
            assert_eq!(upload.finish()[..], sha2::Sha256::digest(&data)[..]);
        }
    }
}
