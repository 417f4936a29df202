//! Prompt lookup: the tokens that followed the last time the text ended as it ends now.

/// The shortest n-gram looked up: a single repeated token predicts too little to pay for a step.
pub const MIN_NGRAM: usize = 2;
/// The longest n-gram that may be asked for: each size tried is a scan of the whole text, once
/// per step.
pub const MAX_NGRAM: usize = 64;

/// Tokens before an occurrence compared with the tokens before the text's n-gram, to choose
/// among several occurrences.
const CONTEXT: usize = 64;

/// Writes to `out` the tokens that followed an earlier occurrence of the longest suffix of
/// `history` of `longest` down to [`MIN_NGRAM`] tokens, at most `max` of them (none when no
/// suffix occurred before). Of several occurrences, the one whose preceding tokens match the
/// text's the furthest back is taken (the latest, of equals): in code, a short n-gram such as
/// an indentation recurs on many lines, and the line it is on says which one is being copied.
/// Allocates nothing beyond `out`.
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
        let start = len - n;
        let pattern = &history[start..];
        let mut best: Option<(usize, usize)> = None;
        // Occurrences start at start - 1 at most, so that at least one token follows each.
        for j in (0..start).rev() {
            if history[j..j + n] != *pattern {
                continue;
            }
            let context = (1..=CONTEXT.min(j))
                .take_while(|&b| history[j - b] == history[start - b])
                .count();
            if best.is_none_or(|(c, _)| context > c) {
                best = Some((context, j));
            }
        }
        if let Some((_, j)) = best {
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
        // Looking up "1 2" alone, the token before it still picks the first occurrence.
        assert_eq!(draft(&h, 2, 1), [3]);
        let h = [5, 1, 2, 3, 0, 1, 2, 8, 6, 1, 2];
        assert_eq!(draft(&h, 3, 1), [8]);
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
    fn of_several_occurrences_the_one_in_the_same_context() {
        // "1 2" occurs after 7 (followed by 3) and after 8 (followed by 4); the text ends "8 1 2".
        let h = [7, 1, 2, 3, 8, 1, 2, 4, 7, 1, 2, 3, 9, 8, 1, 2];
        assert_eq!(draft(&h, 2, 1), [4]);
        // With no context matching, the latest.
        let h = [7, 1, 2, 3, 8, 1, 2, 4, 5, 1, 2];
        assert_eq!(draft(&h, 2, 1), [4]);
    }

    #[test]
    fn an_overlapping_repeat_drafts_the_run() {
        let h = [4, 4, 4, 4];
        assert_eq!(draft(&h, 3, 8), [4]);
        let h = [1, 2, 1, 2, 1, 2];
        assert_eq!(draft(&h, 4, 8), [1, 2]);
    }
}
