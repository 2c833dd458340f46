"""robret.ui: the Streamlit page."""
