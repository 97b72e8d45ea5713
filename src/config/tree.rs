//! A format-neutral document tree with source positions.
//!
//! YAML and TOML files are first parsed into [`Node`]s that remember their line and column, so
//! the decoder can name the exact place of every problem and keep going after the first one.

use saphyr::{LoadableYamlNode, MarkedYamlOwned, ScalarOwned, YamlDataOwned};

/// A position in the source file (1-based line and column, in characters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// One value of the document with where it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: NodeValue,
    pub position: Position,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    Integer(i64),
    Float(f64),
    String(String),
    List(Vec<Node>),
    /// Keys in file order, each with its own position.
    Map(Vec<(Node, Node)>),
}

impl NodeValue {
    /// The kind of value, as a word for error messages ("a string", "a list", …).
    #[must_use]
    pub fn kind_name(&self) -> &'static str {
        match self {
            NodeValue::Null => "null",
            NodeValue::Bool(_) => "a boolean",
            NodeValue::Integer(_) => "an integer",
            NodeValue::Float(_) => "a number",
            NodeValue::String(_) => "a string",
            NodeValue::List(_) => "a list",
            NodeValue::Map(_) => "a mapping",
        }
    }
}

/// A syntax error in the file, before any meaning is looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub position: Position,
    pub message: String,
}

/// The file formats an observers file may be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Toml,
}

/// Parses `text` in `format` into a tree.
///
/// # Errors
/// A [`SyntaxError`] with the position the parser stopped at.
pub fn parse(text: &str, format: Format) -> Result<Node, SyntaxError> {
    match format {
        Format::Yaml => parse_yaml(text),
        Format::Toml => parse_toml(text),
    }
}

fn parse_yaml(text: &str) -> Result<Node, SyntaxError> {
    refuse_yaml_aliases(text)?;
    let documents = MarkedYamlOwned::load_from_str(text).map_err(|error| SyntaxError {
        position: Position {
            line: error.marker().line(),
            column: error.marker().col() + 1,
        },
        message: error.info().to_owned(),
    })?;
    let mut documents = documents.into_iter();
    let Some(first) = documents.next() else {
        return Ok(Node {
            value: NodeValue::Null,
            position: Position { line: 1, column: 1 },
        });
    };
    if let Some(second) = documents.next() {
        return Err(SyntaxError {
            position: yaml_position(&second),
            message: "expected a single YAML document, found a second one".into(),
        });
    }
    convert_yaml(first)
}

/// Aliases are expanded by copying, so a few nested ones ("billion laughs") could make a small
/// file expand to gigabytes. Observers files have no need for them: refuse before loading.
fn refuse_yaml_aliases(text: &str) -> Result<(), SyntaxError> {
    for event in saphyr_parser::Parser::new_from_str(text) {
        match event {
            Ok((saphyr_parser::Event::Alias(_), span)) => {
                return Err(SyntaxError {
                    position: Position {
                        line: span.start.line(),
                        column: span.start.col() + 1,
                    },
                    message: "YAML aliases (*name) are not supported in observers files".into(),
                });
            }
            Ok(_) => {}
            // Syntax errors are reported by the loader, with the same position.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

fn yaml_position(node: &MarkedYamlOwned) -> Position {
    Position {
        line: node.span.start.line(),
        column: node.span.start.col() + 1,
    }
}

fn convert_yaml(node: MarkedYamlOwned) -> Result<Node, SyntaxError> {
    let position = yaml_position(&node);
    let value = match node.data {
        YamlDataOwned::Value(scalar) => match scalar {
            ScalarOwned::Null => NodeValue::Null,
            ScalarOwned::Boolean(flag) => NodeValue::Bool(flag),
            ScalarOwned::Integer(number) => NodeValue::Integer(number),
            ScalarOwned::FloatingPoint(number) => NodeValue::Float(number.into_inner()),
            ScalarOwned::String(text) => NodeValue::String(text),
        },
        YamlDataOwned::Representation(text, _, _) => NodeValue::String(text),
        YamlDataOwned::Sequence(items) => NodeValue::List(
            items
                .into_iter()
                .map(convert_yaml)
                .collect::<Result<_, _>>()?,
        ),
        YamlDataOwned::Mapping(entries) => {
            let mut converted = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                converted.push((convert_yaml(key)?, convert_yaml(value)?));
            }
            NodeValue::Map(converted)
        }
        YamlDataOwned::Tagged(tag, _) => {
            return Err(SyntaxError {
                position,
                message: format!("YAML tags are not supported here (found !{})", tag.suffix),
            });
        }
        YamlDataOwned::Alias(_) => {
            return Err(SyntaxError {
                position,
                message: "YAML aliases (*name) are not supported in observers files".into(),
            });
        }
        YamlDataOwned::BadValue => {
            return Err(SyntaxError {
                position,
                message: "unreadable YAML value".into(),
            });
        }
    };
    Ok(Node { value, position })
}

/// Converts byte offsets into line/column positions.
struct LineIndex<'text> {
    text: &'text str,
    line_starts: Vec<usize>,
}

impl<'text> LineIndex<'text> {
    fn new(text: &'text str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(offset, _)| offset + 1));
        LineIndex { text, line_starts }
    }

    fn position(&self, byte_offset: usize) -> Position {
        let byte_offset = byte_offset.min(self.text.len());
        let line_index = self
            .line_starts
            .partition_point(|&start| start <= byte_offset)
            - 1;
        let line_start = self.line_starts[line_index];
        let column = self
            .text
            .get(line_start..byte_offset)
            .map_or(byte_offset - line_start, |prefix| prefix.chars().count());
        Position {
            line: line_index + 1,
            column: column + 1,
        }
    }
}

fn parse_toml(text: &str) -> Result<Node, SyntaxError> {
    let lines = LineIndex::new(text);
    let table = toml::de::DeTable::parse(text).map_err(|error| SyntaxError {
        position: error
            .span()
            .map_or(Position { line: 1, column: 1 }, |span| {
                lines.position(span.start)
            }),
        message: error.message().trim().to_owned(),
    })?;
    let span = table.span();
    Ok(convert_toml_table(
        table.into_inner(),
        lines.position(span.start),
        &lines,
    ))
}

fn convert_toml_table(
    table: toml::de::DeTable<'_>,
    position: Position,
    lines: &LineIndex<'_>,
) -> Node {
    let entries = table
        .into_iter()
        .map(|(key, value)| {
            let key_node = Node {
                position: lines.position(key.span().start),
                value: NodeValue::String(key.into_inner().into_owned()),
            };
            (key_node, convert_toml(value, lines))
        })
        .collect();
    Node {
        value: NodeValue::Map(entries),
        position,
    }
}

fn convert_toml(value: toml::Spanned<toml::de::DeValue<'_>>, lines: &LineIndex<'_>) -> Node {
    use toml::de::DeValue;
    let position = lines.position(value.span().start);
    let value = match value.into_inner() {
        DeValue::String(text) => NodeValue::String(text.into_owned()),
        DeValue::Integer(number) => {
            i64::from_str_radix(&number.as_str().replace('_', ""), number.radix()).map_or_else(
                |_| NodeValue::String(number.as_str().to_owned()),
                NodeValue::Integer,
            )
        }
        DeValue::Float(number) => number.as_str().replace('_', "").parse::<f64>().map_or_else(
            |_| NodeValue::String(number.as_str().to_owned()),
            NodeValue::Float,
        ),
        DeValue::Boolean(flag) => NodeValue::Bool(flag),
        DeValue::Datetime(moment) => NodeValue::String(moment.to_string()),
        DeValue::Array(items) => NodeValue::List(
            items
                .into_iter()
                .map(|item| convert_toml(item, lines))
                .collect(),
        ),
        DeValue::Table(table) => return convert_toml_table(table, position, lines),
    };
    Node { value, position }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    fn map_keys(node: &Node) -> Vec<(String, Position)> {
        let NodeValue::Map(entries) = &node.value else {
            panic!("not a map: {node:?}")
        };
        entries
            .iter()
            .map(|(key, _)| match &key.value {
                NodeValue::String(text) => (text.clone(), key.position),
                other => panic!("key {other:?}"),
            })
            .collect()
    }

    #[test]
    fn yaml_positions_are_one_based() {
        let tree = parse("a: 1\nbb:\n  - x\n  - 2.5\n", Format::Yaml).unwrap();
        let keys = map_keys(&tree);
        assert_eq!(keys[0], ("a".into(), Position { line: 1, column: 1 }));
        assert_eq!(keys[1], ("bb".into(), Position { line: 2, column: 1 }));
        let NodeValue::Map(entries) = &tree.value else {
            unreachable!()
        };
        let NodeValue::List(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(items[0].position, Position { line: 3, column: 5 });
        assert_eq!(items[1].value, NodeValue::Float(2.5));
    }

    #[test]
    fn toml_positions_count_characters_not_bytes() {
        let tree = parse("# é\n[x]\nkey = \"é\"\nnumber = 0x10\n", Format::Toml).unwrap();
        let NodeValue::Map(entries) = &tree.value else {
            panic!()
        };
        let NodeValue::Map(inner) = &entries[0].1.value else {
            panic!()
        };
        assert_eq!(inner[0].0.position, Position { line: 3, column: 1 });
        assert_eq!(inner[0].1.position, Position { line: 3, column: 7 });
        assert_eq!(inner[1].1.value, NodeValue::Integer(16));
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let error = parse("a: [1, 2\nb: 3\n", Format::Yaml).unwrap_err();
        assert!(error.position.line >= 1, "{error:?}");
        let error = parse("a = \n", Format::Toml).unwrap_err();
        assert_eq!(error.position.line, 1, "{error:?}");
        assert!(!error.message.is_empty());
    }

    #[test]
    fn yaml_aliases_and_multiple_documents_are_refused() {
        let error = parse("a: &x 1\nb: *x\n", Format::Yaml).unwrap_err();
        assert!(error.message.contains("aliases"), "{error:?}");
        assert_eq!(error.position, Position { line: 2, column: 4 });
        let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..12 {
            let previous = char::from(b'a' + level - 1);
            let name = char::from(b'a' + level);
            let references = vec![format!("*{previous}"); 10].join(", ");
            writeln!(laughs, "{name}: &{name} [{references}]").unwrap();
        }
        assert!(
            parse(&laughs, Format::Yaml)
                .unwrap_err()
                .message
                .contains("aliases")
        );
        let error = parse("a: 1\n---\nb: 2\n", Format::Yaml).unwrap_err();
        assert!(error.message.contains("single YAML document"), "{error:?}");
    }
}
