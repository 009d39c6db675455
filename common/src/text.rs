//! Text matching shared by the search index (leaf) and the `search()` fallback (aggregator), so
//! both give the same answer.

/// Tokens as tantivy's default analyzer makes them: split on non-alphanumeric characters,
/// drop tokens of 40 bytes or more, lowercase.
pub fn tokenize(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty() && t.len() < 40)
        .map(str::to_lowercase)
        .collect()
}

/// `search()` semantics: every query token occurs in the text (an empty query matches nothing).
pub fn matches(text: &str, query_tokens: &[String]) -> bool {
    if query_tokens.is_empty() {
        return false;
    }
    let have: std::collections::HashSet<String> = tokenize(text).into_iter().collect();
    query_tokens.iter().all(|w| have.contains(w))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokenizes_like_tantivy_default() {
        assert_eq!(super::tokenize("Ada LOVELACE, née Byron!"), ["ada", "lovelace", "née", "byron"]);
        assert!(super::matches("Ada Lovelace", &super::tokenize("lovelace ADA")));
        assert!(!super::matches("Ada", &super::tokenize("")));
    }
}
