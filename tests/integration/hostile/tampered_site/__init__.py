"""A hospital's ClientApp tampered with: the hostile-site tests ship it as the app of a job."""
