//! Stop strings: text is released as it is generated, except a tail that may be the start of a
//! stop string, which is held until it is known not to be one.

/// Cuts generated text at the first stop string, holding back a tail that may start one.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Returns the text to release and whether a stop string was hit.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`.
pub fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{partial_suffix, StopMatcher};

    #[test]
    fn stop_strings_across_pieces() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dxyz"), (String::new(), true));
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abc E"), ("abc ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn partial_suffixes() {
        let open = "<tool_call>";
        assert_eq!(partial_suffix("abc <tool", open), 5);
        assert_eq!(partial_suffix("abc <", open), 1);
        assert_eq!(partial_suffix("abc", open), 0);
        assert_eq!(partial_suffix("<tool_call", open), 10);
        assert_eq!(partial_suffix("é<", open), 1);
    }
}
