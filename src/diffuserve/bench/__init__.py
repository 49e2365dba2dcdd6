"""`diffuserve bench`: locust users, the user-count sweep, its report and plots."""
