//! Bounds on the SQL a client may send, checked before anything parses it into a tree.
//!
//! DataFusion plans, simplifies and evaluates expressions by recursion, one stack frame per
//! level (several per level, across its passes). A chain of 1,000 `OR` terms (10 KB of text) is
//! 1,000 levels deep, and overflowing the stack aborts the whole process, with every link on it.
//! So the text is measured first, with the tokenizer alone (a flat loop): its size, the operators
//! it holds (each may add a level) and how deep its brackets nest. Under these limits the deepest
//! tree plans well inside a 2 MiB thread stack (tests below and in the server prove it), and the
//! server runs its workers with 8 MiB for margin.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use handoff_store::echo;

use crate::filter::QueryError;

/// The longest filter a reader may send.
pub const MAX_FILTER_BYTES: usize = 16 * 1024;
/// The longest Flight SQL statement.
pub const MAX_SQL_BYTES: usize = 64 * 1024;
/// Operators (`AND`, `OR`, `=`, `+`, `CASE`, `::`, `IN` ...: every symbol, and every keyword
/// that starts an expression or that the parser takes as an operator) in one filter or statement.
pub const MAX_OPERATORS: usize = 256;
/// Brackets inside brackets.
pub const MAX_NESTING: usize = 32;

/// The parser's or planner's own sentence, which may quote the client's text: cut to
/// [`BRIEF_CHARS`] (found by the `filter` fuzz target, which saw 2.4 KB come back).
pub fn brief(detail: &str) -> String {
    match handoff_store::head(detail, BRIEF_CHARS) {
        None => detail.to_string(),
        Some(start) => format!("{start}…"),
    }
}

/// Long enough for a planner's sentence with a list of columns.
pub const BRIEF_CHARS: usize = 400;

/// Checks a filter (`what` = "filter") or statement ("SQL") against the limits above.
pub fn check_expression(what: &str, text: &str, max_bytes: usize) -> Result<(), QueryError> {
    if text.len() > max_bytes {
        return Err(QueryError::Invalid(format!(
            "the {what} is {} bytes; the limit is {max_bytes}. Filter on fewer values, or put them in a link and join",
            text.len()
        )));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, text)
        .tokenize()
        .map_err(|e| {
            QueryError::Invalid(format!(
                "{what} '{}': {}",
                echo(text),
                brief(&e.to_string())
            ))
        })?;
    let (mut operators, mut depth, mut deepest) = (0usize, 0usize, 0usize);
    // The parser only answers what the next token would be (its precedence as an infix or
    // postfix operator); nothing here builds a tree.
    let mut parser = Parser::new(&GenericDialect {}).with_tokens(tokens);
    loop {
        let token = parser.peek_token_ref().token.clone();
        match &token {
            Token::EOF => break,
            Token::LParen | Token::LBracket | Token::LBrace => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            Token::RParen | Token::RBracket | Token::RBrace => depth = depth.saturating_sub(1),
            Token::Word(word) if word.quote_style.is_none() => {
                // Keywords that start an expression, and every keyword the parser would take
                // as an infix or postfix operator here: not only those that read as one, since
                // `x IN (1) IN (1) …` and `x AT TIME ZONE 'UTC' AT TIME ZONE …` chain without
                // end, a level each (the `filter` fuzz target found the first: 2,300 of them in
                // 16 KB overflowed a server worker's stack). A column named like a keyword
                // (`id`, `name`) is no operator there, and costs nothing.
                if matches!(word.keyword, Keyword::NOT | Keyword::CASE | Keyword::WHEN)
                    || (word.keyword != Keyword::NoKeyword
                        && parser.get_next_precedence().map_or(true, |p| p > 0))
                {
                    operators += 1;
                }
            }
            token if is_operand(token) => {}
            // Every other symbol is an operator: comparison, arithmetic, casts, concatenation.
            _ => operators += 1,
        }
        parser.next_token();
    }
    if deepest > MAX_NESTING {
        return Err(QueryError::Invalid(format!(
            "the {what} nests brackets {deepest} deep; the limit is {MAX_NESTING}"
        )));
    }
    if operators > MAX_OPERATORS {
        return Err(QueryError::Invalid(format!(
            "the {what} has {operators} operators; the limit is {MAX_OPERATORS}. A list of values reads better as `x IN (1, 2, 3)` than as a chain of ORs"
        )));
    }
    Ok(())
}

/// Tokens that add no level to an expression: names, literals, separators, spaces.
fn is_operand(token: &Token) -> bool {
    matches!(
        token,
        Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::Whitespace(_)
            | Token::Comma
            | Token::Period
            | Token::SemiColon
            | Token::EOF
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(terms: usize) -> String {
        (0..terms)
            .map(|i| format!("id = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    }

    #[test]
    fn ordinary_filters_pass() {
        for text in [
            "split = 'train'",
            "score > 0.5 AND id % 10 = 0",
            "id IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)",
            "SELECT count(*), avg(x) FROM features WHERE split = 'train' GROUP BY label",
        ] {
            check_expression("filter", text, MAX_FILTER_BYTES).expect(text);
        }
        // A long IN list adds no depth.
        let values: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
        check_expression(
            "filter",
            &format!("id IN ({})", values.join(", ")),
            MAX_FILTER_BYTES,
        )
        .expect("long IN list");
    }

    #[test]
    fn deep_expressions_are_refused_with_the_limit() {
        let err = check_expression("filter", &chain(1000), MAX_FILTER_BYTES)
            .expect_err("1000 ORs")
            .to_string();
        assert!(
            err.contains("the limit is 256") && err.contains("IN ("),
            "{err}"
        );
        let nested = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        let err = check_expression("filter", &nested, MAX_FILTER_BYTES)
            .expect_err("nested")
            .to_string();
        assert!(err.contains("nests brackets 100 deep"), "{err}");
        let long = "x".repeat(MAX_FILTER_BYTES + 1);
        let err = check_expression("filter", &long, MAX_FILTER_BYTES)
            .expect_err("long")
            .to_string();
        assert!(err.contains("the limit is 16384"), "{err}");
        assert!(err.len() < 300, "the text is not echoed whole");
    }

    #[test]
    fn keyword_chains_count_as_operators() {
        // Found by the `filter` fuzz target: none of these words was counted, and 16 KB of them
        // made a tree thousands of levels deep.
        for (what, unit) in [
            ("IN", " IN (1)"),
            ("AT TIME ZONE", " AT TIME ZONE 'UTC'"),
            ("DIV", " DIV 1"),
        ] {
            let text = format!("id{}", unit.repeat(MAX_FILTER_BYTES / unit.len() - 1));
            let err = check_expression("filter", &text, MAX_FILTER_BYTES)
                .expect_err(what)
                .to_string();
            assert!(err.contains("operators; the limit is 256"), "{what}: {err}");
        }
        // Literals, quoted names and columns named like keywords cost nothing: a long list of
        // them stays a list, and `id` (a keyword) is a column here.
        let values = vec!["NULL, TRUE, FALSE, id, name"; 300].join(", ");
        check_expression("filter", &format!("\"in\" IN ({values})"), MAX_FILTER_BYTES)
            .expect("literals");
        let ors = vec!["id = 1"; 128].join(" OR ");
        check_expression("filter", &ors, MAX_FILTER_BYTES).expect("128 = and 127 OR");
    }

    #[test]
    fn parser_sentences_are_cut_short() {
        let long = "x".repeat(3000);
        let err = check_expression("filter", &format!("'{long}"), MAX_FILTER_BYTES)
            .expect_err("unterminated")
            .to_string();
        assert!(err.len() < 1000, "{} bytes", err.len());
        assert_eq!(brief("short"), "short");
        assert_eq!(brief(&long).chars().count(), BRIEF_CHARS + 1);
    }
}
