"""A plan for people and engines: one-line texts (`text`), Graphviz DOT, Mermaid and a rich
tree (`diagram`), the offline HTML report (`html`, `charts`, `report_data`), and vLLM / SGLang
launch scripts with a Kubernetes manifest (`export`)."""
