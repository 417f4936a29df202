//! `model: "auto"`: which of two models answers a request, by a documented rule.

/// What a request looks like to the router.
#[derive(Default)]
pub struct RouteFacts {
    /// Characters of the prompt (all messages, or the prompt text).
    pub chars: usize,
    pub tools: bool,
    /// The last user message (or the prompt), where keywords are looked for.
    pub text: String,
}

impl RouteFacts {
    pub fn chat(messages: &[crate::tokenizer::Message], tools: bool) -> Self {
        RouteFacts {
            chars: messages.iter().map(|m| m.content.chars().count()).sum(),
            tools,
            text: messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map_or(String::new(), |m| m.content.clone()),
        }
    }

    pub fn prompt(text: &str) -> Self {
        RouteFacts {
            chars: text.chars().count(),
            tools: false,
            text: text.to_string(),
        }
    }
}

/// The documented rule behind `model: "auto"`, checked in this order: tools go to the large
/// model (`--route-tools`), a keyword in the last user message goes to the large model, a prompt
/// longer than `long_prompt_chars` goes to the large model, anything else to the small one.
#[derive(Clone, Debug)]
pub struct RouteRule {
    /// The small and large model's names; None: the smallest and largest file.
    pub small: Option<String>,
    pub large: Option<String>,
    pub long_prompt_chars: usize,
    pub tools_to_large: bool,
    pub keywords: Vec<String>,
}

impl RouteRule {
    /// The model (large or not) and the reason.
    pub(super) fn pick(&self, f: &RouteFacts) -> (bool, String) {
        if f.tools {
            return (self.tools_to_large, "tools".into());
        }
        let text = f.text.to_lowercase();
        if let Some(k) = self
            .keywords
            .iter()
            .find(|k| !k.is_empty() && text.contains(&k.to_lowercase()))
        {
            return (true, format!("keyword '{k}'"));
        }
        if f.chars > self.long_prompt_chars {
            return (
                true,
                format!(
                    "long prompt ({} > {} characters)",
                    f.chars, self.long_prompt_chars
                ),
            );
        }
        (false, "default".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_rule_order() {
        let rule = RouteRule {
            small: None,
            large: None,
            long_prompt_chars: 100,
            tools_to_large: true,
            keywords: vec!["Prove".into()],
        };
        let f = |chars: usize, tools: bool, text: &str| RouteFacts {
            chars,
            tools,
            text: text.into(),
        };
        assert_eq!(rule.pick(&f(10, false, "hi")), (false, "default".into()));
        assert_eq!(rule.pick(&f(10, true, "hi")), (true, "tools".into()));
        assert_eq!(
            rule.pick(&f(10, false, "please prove it")),
            (true, "keyword 'Prove'".into())
        );
        assert!(rule.pick(&f(101, false, "hi")).1.starts_with("long prompt"));
        let small_tools = RouteRule {
            tools_to_large: false,
            ..rule
        };
        assert_eq!(
            small_tools.pick(&f(500, true, "x")),
            (false, "tools".into())
        );
    }
}
