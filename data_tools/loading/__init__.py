"""Parts of the one shared loader; the public entry point is ``data_tools.loader.build_dataloader``."""
