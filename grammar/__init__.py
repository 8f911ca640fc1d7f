"""The .flow grammar (flow.lark), shipped as package data."""
