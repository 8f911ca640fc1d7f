"""The flowc compiler: front end, diagnostics, units, checker, spec IR and formatter."""
