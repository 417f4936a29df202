//! Prompt lookup: the tokens that followed the last time the text ended as it ends now.

/// The shortest n-gram looked up: a single repeated token predicts too little to pay for a step.
pub const MIN_NGRAM: usize = 2;

/// Writes to `out` the tokens that followed the latest earlier occurrence of the longest suffix
/// of `history` of `longest` down to [`MIN_NGRAM`] tokens, at most `max` of them (none when no
/// suffix occurred before). The scan reads `history` once per n-gram size and allocates nothing
/// beyond `out`.
pub fn lookup(history: &[u32], longest: usize, max: usize, out: &mut Vec<u32>) {
    out.clear();
    let len = history.len();
    if max == 0 {
        return;
    }
    for n in (MIN_NGRAM..=longest).rev() {
        if n >= len {
            continue;
        }
        let pattern = &history[len - n..];
        // Starts at len - n - 1 at most, so that at least one token follows the occurrence.
        let found = (0..len - n).rev().find(|&j| history[j..j + n] == *pattern);
        if let Some(j) = found {
            let from = j + n;
            out.extend_from_slice(&history[from..len.min(from + max)]);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(history: &[u32], longest: usize, max: usize) -> Vec<u32> {
        let mut out = vec![99];
        lookup(history, longest, max, &mut out);
        out
    }

    #[test]
    fn copies_what_followed_the_latest_occurrence() {
        // "1 2" occurred twice; the latest is followed by 7 8.
        let h = [1, 2, 3, 4, 1, 2, 7, 8, 9, 1, 2];
        assert_eq!(draft(&h, 2, 2), [7, 8]);
        assert_eq!(draft(&h, 2, 10), [7, 8, 9, 1, 2]);
    }

    #[test]
    fn prefers_the_longest_suffix() {
        // "5 1 2" occurred at the start (followed by 3); "1 2" alone last at 6 (followed by 8).
        let h = [5, 1, 2, 3, 0, 1, 2, 8, 5, 1, 2];
        assert_eq!(draft(&h, 3, 1), [3]);
        assert_eq!(draft(&h, 2, 1), [8]);
    }

    #[test]
    fn nothing_without_a_repeat_or_room() {
        assert!(draft(&[1, 2, 3, 4], 4, 8).is_empty());
        assert!(draft(&[1, 2, 1, 2], 2, 0).is_empty());
        assert!(draft(&[], 4, 8).is_empty());
        assert!(draft(&[7], 4, 8).is_empty());
        // A single repeated token is not enough.
        assert!(draft(&[3, 9, 1, 3], 4, 8).is_empty());
    }

    #[test]
    fn an_overlapping_repeat_drafts_the_run() {
        let h = [4, 4, 4, 4];
        assert_eq!(draft(&h, 3, 8), [4]);
        let h = [1, 2, 1, 2, 1, 2];
        assert_eq!(draft(&h, 4, 8), [1, 2]);
    }
}
