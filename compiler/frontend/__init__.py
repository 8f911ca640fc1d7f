"""The front end: .flow text to the checked spec. `parser` (lark, LALR) builds the AST of one
file, `imports` follows `use` and loads the standard library, `check/` resolves names and
types into the spec IR and cross-checks it, `fmt` prints the AST back canonically."""
