"""Research on storymem that is not part of the installed package: it imports storymem, never the reverse."""
