"""Reading models, never training them: summary, the paper's figures, reuse, diagrams, bench."""
