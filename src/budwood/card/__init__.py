"""Model cards: an adapter's README.md rendered from its provenance and evaluation results (docs/cards.md)."""
from budwood.card.render import CardInfo, collect_facts, load_card_info, read_card_metadata, render_card

__all__ = ["CardInfo", "collect_facts", "load_card_info", "read_card_metadata", "render_card"]
