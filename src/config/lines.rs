//! Where each key of a YAML document is: key path (`clusters[0].endpoints[1]`) → line number.
//!
//! serde does not carry source positions, so validation errors are located afterwards by
//! walking the document's parse events, which do.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

impl Walker {
    /// The path of a node starting now, as a value of the innermost container; `None` when the
    /// node is a mapping key.
    fn value_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => key.take().map(|k| join(path, &k)),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => match self.value_path() {
                Some(p) => {
                    self.lines.entry(p).or_insert(mark.line());
                }
                None => {
                    // A key: its line is where the entry is.
                    if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                        self.lines.entry(join(path, &value)).or_insert(mark.line());
                        *key = Some(value);
                    }
                }
            },
            Event::MappingStart(..) => {
                let path = self.value_path().unwrap_or_default();
                self.lines.entry(path.clone()).or_insert(mark.line());
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path().unwrap_or_default();
                self.lines.entry(path.clone()).or_insert(mark.line());
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                self.value_path();
            }
            _ => {}
        }
    }
}

/// Maps every key path in `text` to its 1-based line; empty if the text does not parse.
pub fn key_lines(text: &str) -> HashMap<String, usize> {
    let mut w = Walker::default();
    let mut parser = Parser::new_from_str(text);
    if parser.load(&mut w, false).is_err() {
        return HashMap::new();
    }
    w.lines
}

/// The line of `key`, or of its nearest ancestor that has one.
pub fn line_of(lines: &HashMap<String, usize>, key: &str) -> Option<usize> {
    let mut k = key;
    loop {
        if let Some(l) = lines.get(k) {
            return Some(*l);
        }
        let cut = k.rfind(['.', '['])?;
        k = &k[..cut];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_and_flow_styles_are_located() {
        let text = "workers: 2\nlisteners:\n  - name: a\n    address: x\nclusters:\n  - { name: c, endpoints: [] }\n  - name: d\n    endpoints:\n      - \"1.2.3.4:5\"\n      - bad\n";
        let l = key_lines(text);
        assert_eq!(l.get("workers"), Some(&1));
        assert_eq!(l.get("listeners[0].address"), Some(&4));
        assert_eq!(l.get("clusters[0].endpoints"), Some(&6));
        assert_eq!(l.get("clusters[1].endpoints[1]"), Some(&10));
        assert_eq!(line_of(&l, "clusters[1].endpoints[1].nothing"), Some(10));
        assert_eq!(line_of(&l, "routes[0]"), None);
    }
}
